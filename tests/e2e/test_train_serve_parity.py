"""Train/serve parity over the real path: a labelled sample of the prepared dataset, replayed into
the service through its own intake routes (profile, then the sample's history as events), is
scored by the service as the offline code scores it.

Offline side: ``training.llm.crm_outputs.crm_probabilities`` (the CRM as evaluated), the CRM user
vectors ``training.llm.crm_outputs.user_representations`` (what the gates were trained on) and the
training prompts ``training.llm.prompts.sample_prompts``. Online side: POST /v1/score.
"""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pandas as pd
import pytest
from tests.e2e.e2e_support import LiveServer, Reference, World, engine_dtype, llm_atol

CRM_ATOL = 1e-5


@pytest.fixture(scope="module")
def samples(world: World) -> pd.DataFrame:
    """Three test-split samples of different users, histories short enough for one event batch."""
    test = world.data.split("test")
    test = test[(test["hist_len"] >= 10) & (test["hist_len"] <= 100)]
    return test.drop_duplicates("user_idx").sample(n=3, random_state=0).reset_index(drop=True)


def replay(http: httpx.Client, world: World, sample: pd.Series) -> str:
    """A fresh user id holding exactly the sample's profile and history; returns it."""
    data = world.data
    user = f"e2e-replay-{uuid.uuid4().hex[:8]}"
    row = data.users[data.users["user_idx"] == sample["user_idx"]].iloc[0]
    profile = {c: str(row[c]) for c in data.users.columns if c not in ("user", "user_idx")}
    response = http.put(f"/v1/users/{user}/profile", json={"profile": profile})
    assert response.status_code == 200, response.text

    history = data.history(sample)
    raw_item = dict(zip(data.items["item_idx"], data.items["item"]))
    events = [{"item_id": int(raw_item[int(i)]), "rating": float(r), "timestamp": int(t)}
              for i, r, t in zip(history["item_idx"], history["rating"], history["timestamp"])]
    response = http.post("/v1/events", json={"user_id": user, "events": events})
    assert response.status_code == 200, response.text
    assert response.json()["history_length"] == len(events) == int(sample["hist_len"])
    return user


def test_replayed_samples_score_online_as_offline(world: World, live: LiveServer, http: httpx.Client,
                                                  reference: Reference, samples: pd.DataFrame) -> None:
    from training.llm.prompts import sample_prompts
    from training.llm.crm_outputs import crm_probabilities, user_representations

    data = world.data
    embeddings = np.load(world.data_dir / "embeddings.npy")
    offline_crm = crm_probabilities(data, samples, world.crm_dir, embeddings)
    offline_reps = user_representations(data, samples, world.crm_dir, embeddings)
    offline_prompts = sample_prompts(data, samples, reference.builder, embeddings, reference.model.k_text, "semantic")
    offline_llm = reference.score_prompts(offline_prompts, offline_reps)

    raw_item = dict(zip(data.items["item_idx"], data.items["item"]))
    for i, sample in samples.iterrows():
        user = replay(http, world, sample)
        target = int(raw_item[int(sample["item_idx"])])
        response = http.post("/v1/score", json={"user_id": user, "candidates": [target]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["degraded"] is False and body["cold_start"] is False, body
        served = body["scores"][0]

        # The serving stages, on the same raw history, build token for token the prompt the LoRA was
        # trained on and the user vector its gates were trained on.
        history = data.history(sample)
        profile = {c: str(v) for c, v in data.users[data.users["user_idx"] == sample["user_idx"]].iloc[0].items()
                   if c not in ("user", "user_idx")}
        view = reference.view_of(np.asarray([raw_item[int(x)] for x in history["item_idx"]]),
                                 history["rating"].to_numpy(np.float32), profile)
        assert reference.prompt_of(view, target) == offline_prompts[i], f"sample {i}: prompts differ"
        np.testing.assert_allclose(reference.crm_of(view, [target]).user_rep.numpy(), offline_reps[i].numpy(),
                                   atol=1e-5, err_msg=f"sample {i}: user vectors differ")

        assert served["crm_score"] == pytest.approx(float(offline_crm[i]), abs=CRM_ATOL), f"sample {i}"
        # The offline reference is float32; the tolerance follows the service's engine dtype.
        assert served["llm_score"] == pytest.approx(float(offline_llm[i]), abs=llm_atol(engine_dtype(live))), \
            f"sample {i}"
