import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.config import TorchSettings
from service.engine.base import EngineCall, ForwardInterrupted, LoRABanks, UserAdapter, UserMixture
from service.engine.lora_slot import TokenMixtures
from service.engine.torch_engine import DeadlineExceeded, TorchEngine
from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRA, PersonalizedLoRAConfig
from training.llm.scoring import score_sequences

YES, NO, PAD = 5, 7, 0
TARGETS = ["q_proj", "v_proj"]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def fresh_engine() -> TorchEngine:
    """An engine no request has run on yet (the module's ``setup`` engine has a history)."""
    torch.manual_seed(0)
    return TorchEngine(LlamaForCausalLM(tiny_config()), yes_id=YES, no_id=NO, target_modules=TARGETS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(tiny_config()).save_pretrained(base)
    reference = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    lora = PersonalizedLoRA(reference, PersonalizedLoRAConfig(n_meta=4, user_dim=8))
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.normal_(std=0.3)
    lora.eval()
    mixer = AdapterMixer(lora.cfg, lora.trainable_state_dict())
    engine = TorchEngine(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), TorchSettings(torch_max_batch=3),
                         yes_id=YES, no_id=NO, target_modules=TARGETS)
    return reference, lora, mixer, engine


def adapter_for(mixer, lora, rep, key):
    return UserAdapter(key, mixer.adapter(mixer.mixtures(rep)), lora.cfg.scaling)


def prompts(seed):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, 99, size=17).tolist()
    return prefix, [rng.integers(1, 99, size=n).tolist() for n in (4, 9, 1, 6, 12, 3, 7)]


def test_prefix_reuse_is_exact_against_scoring_each_prompt_alone(setup) -> None:
    reference, lora, mixer, engine = setup
    rep = torch.randn(8)
    prefix, suffixes = prompts(0)
    got = engine.score(adapter_for(mixer, lora, rep, "u1"), prefix, suffixes)
    with lora.user(rep.reshape(1, -1)):
        alone = [float(score_sequences(reference, [prefix + s], YES, NO, PAD)[0]) for s in suffixes]
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_no_adapter_scores_the_base_model(setup) -> None:
    reference, lora, mixer, engine = setup
    prefix, suffixes = prompts(1)
    with lora.user(torch.zeros(1, 8)):
        base_engine_scores = engine.score(None, prefix, suffixes)
    plain = LlamaForCausalLM.from_pretrained(reference.name_or_path, dtype=torch.float32).eval()
    expected = score_sequences(plain, [prefix + s for s in suffixes], YES, NO, PAD).numpy()
    np.testing.assert_allclose(base_engine_scores, expected, atol=1e-5)


def test_the_base_model_is_lent_without_an_adapter_and_with_no_forward_beside(setup) -> None:
    reference, lora, mixer, engine = setup
    adapter = adapter_for(mixer, lora, torch.randn(8), "lent")
    engine.slots.install(adapter)  # as if a forward had left it installed
    ids = torch.tensor([prompts(3)[0]])
    plain = LlamaForCausalLM.from_pretrained(reference.name_or_path, dtype=torch.float32).eval()
    with ThreadPoolExecutor(max_workers=1) as pool:
        with engine.base_model() as model, torch.inference_mode():
            assert model is engine.model
            np.testing.assert_allclose(model(ids).logits.numpy(), plain(ids).logits.numpy(), atol=1e-5)
            waiting = pool.submit(engine.score, adapter, *prompts(3))  # a forward waits for the loan to end
            time.sleep(0.2)
            assert not waiting.done()
        assert waiting.result(timeout=30).shape == (7,)


def test_concurrent_users_never_see_each_others_adapter(setup) -> None:
    _, lora, mixer, engine = setup
    users = {f"u{i}": adapter_for(mixer, lora, torch.randn(8, generator=torch.Generator().manual_seed(i)), f"u{i}")
             for i in range(4)}
    prefix, suffixes = prompts(2)
    expected = {k: engine.score(a, prefix, suffixes) for k, a in users.items()}
    assert not np.allclose(expected["u0"], expected["u1"])
    jobs = [k for _ in range(6) for k in users]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda k: (k, engine.score(users[k], prefix, suffixes)), jobs))
    for key, scores in results:
        np.testing.assert_array_equal(scores, expected[key])


def test_bad_input(setup) -> None:
    *_, engine = setup
    with pytest.raises(ValueError, match="at least one token"):
        engine.score(None, [1, 2], [[3], []])
    assert engine.score(None, [1, 2], []).shape == (0,)


def test_a_passed_deadline_abandons_the_forward(setup) -> None:
    import time

    from service.engine.torch_engine import DeadlineExceeded

    *_, engine = setup
    prefix, suffixes = prompts(3)
    with pytest.raises(DeadlineExceeded):
        engine.score(None, prefix, suffixes, deadline=time.perf_counter() - 1)
    assert engine.score(None, prefix, suffixes, deadline=time.perf_counter() + 60).shape == (len(suffixes),)


def test_shared_suffix_runs_are_computed_once_and_stay_exact(setup) -> None:
    reference, lora, mixer, engine = setup
    rng = np.random.default_rng(5)
    prefix = rng.integers(1, 99, size=9).tolist()
    shared_a, shared_b = rng.integers(1, 99, size=6).tolist(), rng.integers(1, 99, size=5).tolist()
    suffixes = [shared_a + rng.integers(1, 99, size=n).tolist() for n in (1, 3, 4)]
    suffixes += [shared_a + shared_b + rng.integers(1, 99, size=n).tolist() for n in (2, 5)]
    suffixes += [rng.integers(1, 99, size=n).tolist() for n in (3, 7)] + [shared_a[:3]]
    rep = torch.randn(8)
    adapter = adapter_for(mixer, lora, rep, "radix")
    settings, engine.settings = engine.settings, engine.settings.model_copy(update={"torch_min_shared_tokens": 2})
    try:
        got = engine.score(adapter, prefix, suffixes)
    finally:
        engine.settings = settings
    # the prefix; shared_a[:2] once for the six rows that start with it (shared_a[:3] is one), the
    # rest of shared_a once for the five that go on with it, then shared_b once for its two
    assert engine.last_extensions == [9, 2, 4, 5]
    with lora.user(rep.reshape(1, -1)):
        alone = [float(score_sequences(reference, [prefix + s], YES, NO, PAD)[0]) for s in suffixes]
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_runs_shared_after_a_short_common_start_are_found(setup) -> None:
    """Histories numbered "1. ..." all share a few leading tokens and then fall into groups that
    share whole lines; the groups' runs must still be computed once each."""
    reference, lora, mixer, engine = setup
    rng = np.random.default_rng(11)
    prefix, start = rng.integers(1, 99, size=6).tolist(), [3, 4]
    line_a, line_b = rng.integers(1, 99, size=10).tolist(), rng.integers(1, 99, size=12).tolist()
    suffixes = [start + line_a + rng.integers(1, 99, size=n).tolist() for n in (2, 4, 3)]
    suffixes += [start + line_b + rng.integers(1, 99, size=n).tolist() for n in (5, 1)]
    suffixes += [start + rng.integers(1, 99, size=6).tolist()]
    rep = torch.randn(8)
    # the 2-token start alone saves 10
    settings, engine.settings = engine.settings, engine.settings.model_copy(update={"torch_min_shared_tokens": 12})
    try:
        got = engine.score(adapter_for(mixer, lora, rep, "short-start"), prefix, suffixes)
    finally:
        engine.settings = settings
    # the prefix with the start every suffix shares, then line_a and line_b
    assert sorted(engine.last_extensions) == [8, 10, 12]
    with lora.user(rep.reshape(1, -1)):
        alone = [float(score_sequences(reference, [prefix + s], YES, NO, PAD)[0]) for s in suffixes]
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_expected_time_follows_the_recent_pace_per_prompt_token() -> None:
    engine = fresh_engine()
    prefix, suffixes = prompts(9)
    assert engine.expected_ms(prefix, suffixes) is None  # no request yet: nothing to say
    engine.score(None, prefix, suffixes)
    once = engine.expected_ms(prefix, suffixes)
    assert once is not None and once > 0
    assert engine.expected_ms(prefix, suffixes + suffixes) == pytest.approx(
        once * (len(prefix) + 2 * sum(map(len, suffixes))) / (len(prefix) + sum(map(len, suffixes))))
    with pytest.raises(DeadlineExceeded):  # refused before it starts: says nothing of the pace
        engine.score(None, prefix, suffixes, deadline=0.0)
    assert engine.expected_ms(prefix, suffixes) == once
    engine._last_forward -= 60.0  # a minute without a forward: a stale pace predicts nothing
    assert engine.expected_ms(prefix, suffixes) is None
    engine.pace_max_age_s = None  # background forwards keep it measured: it never ages out
    assert engine.expected_ms(prefix, suffixes) == once


def test_a_background_forward_yields_when_interrupted() -> None:
    engine = fresh_engine()
    prefix, suffixes = prompts(9)
    calls = []

    def interrupted() -> bool:
        calls.append(1)
        return len(calls) > 1  # a request arrives after the first layer

    with pytest.raises(ForwardInterrupted):
        engine.score(None, prefix, suffixes, None, interrupted)
    assert len(calls) == 2
    np.testing.assert_allclose(engine.score(None, prefix, suffixes), engine.score(None, prefix, suffixes))


def test_an_abandoned_forward_raises_the_expected_time_to_what_it_ran() -> None:
    engine = fresh_engine()
    prefix, suffixes = prompts(9)
    calls = {"n": 0}
    check = engine._check_deadline

    def slow_second_layer() -> None:  # the deadline passes 50 ms into the forward
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(0.05)
        check()

    engine._check_deadline = slow_second_layer
    with pytest.raises(DeadlineExceeded):
        engine.score(None, prefix, suffixes, deadline=time.perf_counter() + 0.02)
    assert engine.expected_ms(prefix, suffixes) >= 50.0


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_the_native_kernels_are_used_on_cpus_and_score_as_torch_kernels_do(setup) -> None:
    """The default CPU engine runs the native kernels (a build failure would otherwise pass
    unnoticed as the fallback), and scores as the engine on torch's kernels does, shared runs
    and several contexts in one forward included."""
    reference, lora, mixer, engine = setup
    assert engine.ragged.kernel is not None
    torch.manual_seed(0)
    plain = TorchEngine(LlamaForCausalLM.from_pretrained(reference.name_or_path, dtype=torch.float32),
                        TorchSettings(torch_max_batch=3, torch_native_kernels=False), yes_id=YES, no_id=NO,
                        target_modules=TARGETS)
    assert plain.ragged.kernel is None
    adapter = adapter_for(mixer, lora, torch.randn(8), "u-native")
    rng = np.random.default_rng(5)
    prefix = rng.integers(1, 99, size=11).tolist()
    shared = rng.integers(1, 99, size=14).tolist()
    suffixes = [shared + rng.integers(1, 99, size=n).tolist() for n in (3, 8, 1)]
    suffixes += [rng.integers(1, 99, size=n).tolist() for n in (5, 20, 2)]
    got = engine.score(adapter, prefix, suffixes)
    assert len(engine.last_extensions) > 1  # a shared run was cached
    np.testing.assert_allclose(got, plain.score(adapter, prefix, suffixes), atol=1e-5)


ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def every_module(tmp_path_factory):
    """A tiny model with meta-LoRA banks on every projection, its mixer and an engine on it."""
    torch.manual_seed(1)
    base = tmp_path_factory.mktemp("every")
    LlamaForCausalLM(tiny_config()).save_pretrained(base)
    lora = PersonalizedLoRA(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
                            PersonalizedLoRAConfig(n_meta=3, r=4, user_dim=8, target_modules=ALL_MODULES))
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.normal_(std=0.3)
    mixer = AdapterMixer(lora.cfg, lora.trainable_state_dict())
    engine = TorchEngine(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), TorchSettings(torch_max_batch=5),
                         yes_id=YES, no_id=NO, target_modules=ALL_MODULES)
    banks = LoRABanks.of("v1", mixer)
    return lora, mixer, engine, banks


def mixture_for(mixer, banks, rep, key) -> UserMixture:
    return UserMixture(key, banks, mixer.mixtures(rep), user_id=key)


def test_the_mixture_in_the_forward_equals_the_materialized_adapter_for_every_module(every_module) -> None:
    """float32: each row's LoRA term from the banks and its gate weights is the mixed adapter's."""
    lora, mixer, engine, banks = every_module
    assert set(banks.module_names) == set(engine.slots.slots) and len(engine.slots.slots) == 2 * len(ALL_MODULES)
    for seed in range(3):
        rep = torch.randn(8)
        prefix, suffixes = prompts(10 + seed)
        materialized = engine.score(UserAdapter(f"m{seed}", mixer.adapter(mixer.mixtures(rep)), lora.cfg.scaling),
                                    prefix, suffixes)
        mixed = engine.score(mixture_for(mixer, banks, rep, f"u{seed}"), prefix, suffixes)
        np.testing.assert_allclose(mixed, materialized, atol=1e-5)
    for name, module in engine.slots.slots.items():  # per module: the slot's output itself
        x = torch.randn(6, module.base.in_features)
        alphas = mixer.mixtures(torch.randn(8))
        a, b = mixer.adapter(alphas)[name]
        m = banks.module_names.index(name)
        engine.slots.install_mixtures(banks, TokenMixtures(alphas.expand(6, -1, -1), torch.arange(6)))
        with torch.no_grad():
            got = module(x)
            expected = module.base(x) + lora.cfg.scaling * (x @ a) @ b
        engine.slots.install(None)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{name} (bank {m})")


def test_one_forward_of_three_users_equals_three_single_user_forwards(every_module) -> None:
    lora, mixer, engine, banks = every_module
    users = [mixture_for(mixer, banks, torch.randn(8), f"user{i}") for i in range(3)]
    calls = [EngineCall(user, *prompts(20 + i)) for i, user in enumerate(users)]
    forwards = []
    engine.observe_rows = forwards.append
    try:
        together = engine.score_many(calls)
        packed_forwards = len(forwards)
        alone = [engine.score(call.adapter, call.prefix, call.suffixes) for call in calls]
    finally:
        engine.observe_rows = None
    assert packed_forwards < len(forwards) - packed_forwards  # fewer forwards for the three together
    assert any(len({id(r.context) for r in rows}) > 1 for rows in forwards[:packed_forwards])
    for got, expected in zip(together, alone):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # and each user's rows took its own mixture: swapping two users' adapters changes their scores
    swapped = engine.score_many([EngineCall(users[1], *prompts(20)), EngineCall(users[0], *prompts(21))])
    assert np.abs(swapped[0] - together[0]).max() > 1e-3


def test_a_late_call_leaves_the_forward_and_the_others_finish(every_module) -> None:
    lora, mixer, engine, banks = every_module
    users = [mixture_for(mixer, banks, torch.randn(8), f"late{i}") for i in range(2)]
    expected = engine.score(users[1], *prompts(31))
    passed = time.perf_counter() - 1.0
    results = engine.score_many([EngineCall(users[0], *prompts(30), deadline=passed),
                                 EngineCall(users[1], *prompts(31))])
    assert isinstance(results[0], DeadlineExceeded)
    np.testing.assert_allclose(results[1], expected, atol=1e-6)


def test_only_mixtures_of_one_version_share_a_forward(every_module) -> None:
    lora, mixer, engine, banks = every_module
    rep = torch.randn(8)
    other = LoRABanks("v2", banks.module_names, banks.a, banks.b, banks.scaling)
    with pytest.raises(ValueError, match="same version"):
        engine.score_many([EngineCall(mixture_for(mixer, banks, rep, "a"), *prompts(1)),
                           EngineCall(mixture_for(mixer, other, rep, "b"), *prompts(2))])
    with pytest.raises(ValueError, match="same version"):
        engine.score_many([EngineCall(mixture_for(mixer, banks, rep, "a"), *prompts(1)),
                           EngineCall(UserAdapter("m", mixer.adapter(mixer.mixtures(rep)), banks.scaling),
                                      *prompts(2))])
