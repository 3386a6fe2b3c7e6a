import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from service.llm.personalized_lora import ADAPTER_CONFIG, PersonalizedLoRA, PersonalizedLoRAConfig

USER_DIM = 8


@pytest.fixture()
def base_dir(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def personalized(base_dir, **kw) -> tuple[LlamaForCausalLM, PersonalizedLoRA]:
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    lora = PersonalizedLoRA(model, PersonalizedLoRAConfig(n_meta=4, user_dim=USER_DIM, **kw)).eval()
    with torch.no_grad():  # trained-looking weights: B is zero at init
        for layer in lora.layers.values():
            layer.lora_B.normal_(std=0.2)
    return model, lora


def test_materialized_adapter_equals_mixture_forward(base_dir, tmp_path) -> None:
    model, lora = personalized(base_dir, temperature=2.0)
    ids = torch.randint(0, 97, (2, 11))
    user = torch.randn(1, USER_DIM)
    with torch.no_grad(), lora.user(user):
        mixture = model(ids).logits
    out = lora.materialize(user, tmp_path / "adapter", str(base_dir))
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    with torch.no_grad():
        served = peft_model(ids).logits
    torch.testing.assert_close(served, mixture, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
    assert (plain - mixture).abs().max() > 1e-3  # the adapter does change the model
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_different_users_get_different_adapters(base_dir) -> None:
    _, lora = personalized(base_dir)
    a = lora.user_adapter(torch.randn(USER_DIM))
    b = lora.user_adapter(torch.randn(USER_DIM))
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_batch_rows_use_their_own_user(base_dir) -> None:
    model, lora = personalized(base_dir)
    ids = torch.randint(0, 97, (3, 7))
    users = torch.randn(3, USER_DIM)
    with torch.no_grad():
        with lora.user(users):
            batched = model(ids).logits
        for i in range(3):
            with lora.user(users[i : i + 1]):
                torch.testing.assert_close(model(ids[i : i + 1]).logits, batched[i : i + 1], atol=1e-5, rtol=0)


def test_shared_lora_baseline_and_state_round_trip(base_dir) -> None:
    with pytest.raises(ValueError, match="n_meta = 1"):
        PersonalizedLoRAConfig(gated=False, n_meta=4)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    shared = PersonalizedLoRA(model, PersonalizedLoRAConfig(gated=False, n_meta=1, user_dim=USER_DIM))
    assert not any("gate" in k for k in shared.trainable_state_dict())
    assert torch.equal(shared.user_adapter(None)[next(iter(shared.user_adapter(None)))],
                       shared.user_adapter(torch.randn(USER_DIM))[next(iter(shared.user_adapter(None)))])
    _, lora = personalized(base_dir)
    state = lora.trainable_state_dict()
    _, other = personalized(base_dir)
    other.load_trainable_state_dict(state)
    rep = torch.randn(USER_DIM)
    for k, v in lora.user_adapter(rep).items():
        torch.testing.assert_close(other.user_adapter(rep)[k], v)
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_A"))
    bad[key] = bad[key][:, :, :4]
    with pytest.raises(ValueError, match="shape"):
        other.load_trainable_state_dict(bad)


def test_only_lora_parameters_train(base_dir) -> None:
    model, lora = personalized(base_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or ".gate." in n) for n in trainable)


def test_serving_mixer_matches_training_module(base_dir) -> None:
    from service.llm.personalized_lora import AdapterMixer, peft_weights

    _, lora = personalized(base_dir, temperature=3.0)
    mixer = AdapterMixer(lora.cfg, lora.trainable_state_dict())
    rep = torch.randn(USER_DIM)
    served = peft_weights(mixer.adapter(mixer.mixtures(rep)))
    for key, value in lora.user_adapter(rep).items():
        torch.testing.assert_close(served[key], value, atol=1e-6, rtol=0)
    assert mixer.mixtures(rep).shape == (len(lora.module_names), 4)
