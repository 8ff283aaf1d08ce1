"""Integrations with inference libraries (transformers, mlx-lm). Each imports its library on import."""

# What to run when MLX or mlx-lm is missing (the `mlx` extra installs both; on Linux MLX's CPU backend).
MLX_INSTALL_HINT = (
    'attnforge\'s MLX integration needs MLX and mlx-lm: pip install "attnforge[mlx]" '
    '(on Linux this installs "mlx[cpu]"; plain "mlx" without [cpu] does not import there)'
)
