"""The real SmolLM2-135M-Instruct (DESIGN.md, "Model weights") through the accelerator, fp32 on CPU.

Loading it from the GGUF takes 30-50 s the first time on 2 cores; `models.load_smollm2` keeps a converted
copy (~1 s afterwards). Attention runs on torch here: the Triton interpreter needs about a minute for this
model's 30 layers; the kernels themselves are checked on the six tiny families (test_accel.py) and in
test_decode.py.
"""

import pytest
import torch

from attnforge import models

pytestmark = pytest.mark.skipif(models.smollm2_missing() is not None, reason=str(models.smollm2_missing()))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2(device="cpu")


def test_smollm2_answers_as_transformers_does_and_says_paris(smollm2):
    from attnforge.accel import accelerate
    from attnforge.accel.text import chat_text

    model, tokenizer = smollm2
    ids = tokenizer(chat_text(tokenizer, QUESTION), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
        )
    acc = accelerate(model, tokenizer, max_seq_len=256, attention="torch")
    result = acc.generate(QUESTION, max_new_tokens=20)
    assert result.tokens[0] == expected[0, ids.shape[1] :].tolist()
    assert result.finish_reasons == ["eos"]
    assert "Paris" in result.text, result.text
    assert result.text == tokenizer.decode(result.tokens[0], skip_special_tokens=True)


def test_the_converted_copy_is_plain_safetensors_with_the_tokenizer(smollm2):
    folder = models._smollm2_converted()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
