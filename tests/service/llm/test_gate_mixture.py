import numpy as np
import pytest

from service.llm.gate_mixture import MetaWeight, gate_mixture, layer_group, top_weights

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.10.self_attn.q_proj"]


def test_layer_group_names_the_transformer_layer():
    assert layer_group("model.layers.12.self_attn.v_proj") == "layers.12"
    assert layer_group("layers.3.mlp.up_proj") == "layers.3"
    assert layer_group("lm_head") == "lm_head"


def test_top_weights_are_the_heaviest_first_ties_by_index():
    assert top_weights(np.array([0.1, 0.4, 0.1, 0.4]), 3) == (MetaWeight(1, 0.4), MetaWeight(3, 0.4),
                                                              MetaWeight(0, 0.1))
    assert len(top_weights(np.array([0.5, 0.5]), 5)) == 2


def test_mixture_per_layer_group_and_averaged():
    alphas = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1],   # layer 0: mean (0.6, 0.3, 0.1)
                       [0.1, 0.1, 0.8], [0.1, 0.3, 0.6],   # layer 1: mean (0.1, 0.2, 0.7)
                       [0.2, 0.6, 0.2]])                   # layer 10
    mixture = gate_mixture(MODULES, alphas, top_k=2)
    assert mixture.n_meta == 3
    assert [g.group for g in mixture.layers] == ["layers.0", "layers.1", "layers.10"]  # layer order, not text
    assert [g.modules for g in mixture.layers] == [2, 2, 1]
    layer0, layer1, _ = mixture.layers
    assert [w.meta_lora for w in layer0.top] == [0, 1] and layer0.top[0].weight == pytest.approx(0.6)
    assert [w.meta_lora for w in layer1.top] == [2, 1] and layer1.top[0].weight == pytest.approx(0.7)
    assert mixture.averaged.group == "all" and mixture.averaged.modules == 5
    mean = alphas.mean(0)
    assert [w.meta_lora for w in mixture.averaged.top] == list(np.argsort(-mean)[:2])
    assert mixture.averaged.top[0].weight == pytest.approx(mean.max())


def test_mismatched_alphas_are_refused():
    with pytest.raises(ValueError, match="5 modules"):
        gate_mixture(MODULES, np.ones((4, 3)), 2)
