"""Streamed training data: the Ray Data tokenize task, the domain streams' fixed order (a pure function
of the position, resumed by counting), length grouping, the split of a global batch between workers,
and TL;DR's per-step draws replayed from the weights' history."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest

from tokenskip.train.config import DataSourceConfig, TLDRSettings, TrainConfig
from tokenskip.train.data import (
    IGNORE_INDEX,
    DomainStream,
    StreamExample,
    WorkerBatches,
    collate,
    iter_stream_examples,
    micro_batches,
    padding_fraction,
    stream_positions,
    tokenize_example,
    tokenize_rows,
)
from tokenskip.train.tldr import TLDRState, WeightedDomainSampler


def _rows(lengths: list[int]) -> list[StreamExample | None]:
    """Row i has ids [i, i, ...] of length lengths[i] (0 = a row the cutoff dropped)."""
    return [StreamExample(np.full(n, i, dtype=np.int32), 1) if n else None for i, n in enumerate(lengths)]


def _stream(rows, *, window=8, chunk=4, seed=7, grouped=True, opened=None) -> DomainStream:
    def open_epoch(epoch):
        if opened is not None:
            opened.append(epoch)
        return iter(rows)

    return DomainStream(
        open_epoch, name="d", domain=0, seed=seed, window=window, chunk=chunk, group_by_length=grouped
    )


def _ids(examples) -> list[int]:
    return [int(e.input_ids[0]) for e in examples]


def test_domain_stream_order_is_fixed_covers_each_epoch_and_resumes_by_skipping():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 50, size=30)]
    lengths[5] = 0  # dropped by the cutoff: never served, counted once
    rows = _rows(lengths)
    stream = _stream(rows)
    served = _ids(stream.next() for _ in range(29 * 8))  # 29 windows of 8 = 8 epochs of 29 rows
    assert collections.Counter(served) == {i: 8 for i in range(30) if i != 5}  # each kept row once an epoch
    for k in range(29):  # window k reorders rows [8k, 8k + 8) of the epochs laid end to end
        assert sorted(served[8 * k : 8 * k + 8]) == sorted(
            ([i for i in range(30) if i != 5] * 8)[8 * k : 8 * k + 8]
        )
    assert served[:29] != served[29:58]  # epochs differ (windows run across epoch borders)
    assert stream.dropped == 1 and stream.epoch_length == 29
    served = served[:87]
    again, other_seed = _stream(rows), _stream(rows, seed=8)
    assert _ids(again.next() for _ in range(87)) == served  # a pure function of the position
    assert _ids(other_seed.next() for _ in range(29)) != served[:29]

    for skip in (0, 3, 8, 29, 40, 70):  # resume = skip the count, then the same order
        resumed = _stream(rows)
        resumed.skip(skip)
        assert _ids(resumed.next() for _ in range(87 - skip)) == served[skip:], skip
    # Whole epochs are skipped without being read once the epoch length is known.
    opened: list[int] = []
    known = _stream(rows, opened=opened)
    known.skip(29)  # reads epoch 0 (and its last window's first rows of epoch 1): learns its length
    known.skip(29 * 5 + 2)
    assert opened == [0, 1, 6] and _ids([known.next()]) == _ids([_skipped(rows, 29 * 6 + 2)])

    # A domain no larger than a window is read once, then replayed from memory in the same order.
    small_opened: list[int] = []
    small = _stream(rows[:6], window=8, chunk=4, opened=small_opened)
    small_served = _ids(small.next() for _ in range(40))
    assert small_opened == [0] and collections.Counter(small_served) == {i: 8 for i in (0, 1, 2, 3, 4)}
    fresh = _stream(rows[:6], window=8, chunk=4)
    fresh.skip(20)
    assert _ids(fresh.next() for _ in range(20)) == small_served[20:]

    with pytest.raises(ValueError, match="no example that fits"):
        _stream(_rows([0, 0])).next()


def _skipped(rows, n):
    stream = _stream(rows)
    for _ in range(n):
        stream.next()
    return stream.next()


def test_length_grouping_pads_little_and_keeps_chunks_of_neighbours():
    # Long-tailed lengths like reasoning CoTs (lognormal, median ~400, a tail to ~8k).
    lengths = [max(8, int(n)) for n in np.random.default_rng(1).lognormal(6.0, 0.9, size=2048)]
    rows = _rows(lengths)
    batch = 8
    grouped = _stream(rows, window=64 * batch, chunk=batch)
    plain = _stream(rows, window=64 * batch, chunk=batch, grouped=False)
    grouped_batches = [[grouped.next() for _ in range(batch)] for _ in range(256)]
    plain_batches = [[plain.next() for _ in range(batch)] for _ in range(256)]
    padded, unpadded = padding_fraction(plain_batches), padding_fraction(grouped_batches)
    assert padded > 0.4 and unpadded < 0.15, (padded, unpadded)  # measured: 0.65 vs 0.11
    # Same rows, other order: grouping changes which rows meet, not which are seen.
    assert sorted(_ids(e for b in grouped_batches for e in b)) == sorted(
        _ids(e for b in plain_batches for e in b)
    )
    # Within a step, micro-batches of similar rows: a step of 8 rows split into 4 micro-batches.
    step = [r for r in rows[:8]]
    assert padding_fraction(micro_batches(step, 2, True)) < padding_fraction(micro_batches(step, 2, False))
    assert sorted(_ids(e for m in micro_batches(step, 2, True) for e in m)) == list(range(8))


def test_workers_take_contiguous_blocks_of_the_same_global_batch():
    rows = _rows([int(n) for n in np.random.default_rng(2).integers(1, 40, size=50)])
    slots = [[0] * 6 for _ in range(10)]
    single = WorkerBatches([_stream(rows, window=6, chunk=3)], rank=0, world_size=1)
    pair = [WorkerBatches([_stream(rows, window=6, chunk=3)], rank=r, world_size=2) for r in (0, 1)]
    for step_slots in slots:
        whole = single.take(step_slots)
        first, second = pair[0].take(step_slots), pair[1].take(step_slots)
        assert _ids(first) == _ids(whole[:3]) and _ids(second) == _ids(whole[3:])
        # Each worker's block is one length-sorted chunk of the window: no row longer than the first.
        assert [len(e) for e in first] == sorted((len(e) for e in first), reverse=True)
    with pytest.raises(ValueError, match="do not split evenly"):
        pair[0].take([0] * 5)


def _tldr_settings() -> TLDRSettings:
    return TLDRSettings.model_validate(
        {
            "domains": [
                {"name": "short", "role": "short", "source": {"path": "s.jsonl"}},
                {"name": "long", "role": "long", "source": {"path": "l.jsonl"}},
            ],
            "short_reference": {"tokens": 100, "accuracy": 0.6},
            "long_reference": {"tokens": 500, "accuracy": 0.9},
            "eval_steps": 3,
            "dev": {"path": "dev.jsonl"},
        }
    )


def test_tldr_stream_positions_replay_from_the_weight_history():
    """A run that re-weights every 3 steps; a resume at step 7 recomputes each domain's stream
    position from (seed, history) alone and then serves exactly what the live run served."""
    settings = _tldr_settings()
    sampler = WeightedDomainSampler([10, 10], global_batch=8, seed=5)
    short_rows, long_rows = _rows([3] * 10), _rows([9] * 10)

    def batches():
        return WorkerBatches([_stream(short_rows), _stream(long_rows, seed=9)], rank=0, world_size=1)

    live, state = batches(), TLDRState.initial(settings)
    served, positions_at = [], {}
    for step in range(10):
        positions_at[step] = [s.position for s in live.streams]
        served.append(
            [
                (len(e), int(e.input_ids[0]))
                for e in live.take(sampler.domains_at(step, state.weights_at(step)))
            ]
        )
        if (step + 1) % settings.eval_steps == 0:  # long outputs, low accuracy: weights move
            state.reweight(
                step + 1, accuracy=0.2 + 0.1 * step, mean_tokens=400 - 30 * step, settings=settings
            )
    assert len({tuple(h["weights"].values()) for h in state.history}) == 4
    restored = TLDRState.from_dict(state.to_dict())
    for step in (0, 3, 7, 9):
        replayed = stream_positions(lambda s: sampler.domains_at(s, restored.weights_at(s)), step, 2)
        assert replayed == positions_at[step]
    resumed = batches()
    resumed.fast_forward(stream_positions(lambda s: sampler.domains_at(s, restored.weights_at(s)), 7, 2))
    again = [
        [(len(e), int(e.input_ids[0])) for e in resumed.take(sampler.domains_at(s, restored.weights_at(s)))]
        for s in (7, 8, 9)
    ]
    assert again == served[7:]
    # Both domains were drawn, by the weights of the step.
    assert collections.Counter(n for step in served for n, _ in step).keys() == {3, 9}


def test_tokenize_task_matches_tokenize_example(tiny_causal_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    source = DataSourceConfig(path="unused.parquet", question_field="q", response_field="r")
    batch = pa.table({"q": ["What is 2 + 2?", "x " * 300], "r": ["2 + 2 = 4. $\\boxed{4}$", "long prompt"]})
    out = tokenize_rows(
        batch,
        source=source.model_dump(mode="json"),
        kind="cot",
        tokenizer_name=str(tiny_causal_lm),
        system=None,
        cutoff_len=64,
    )
    first, dropped = list(iter_stream_examples([out]))
    assert dropped is None  # its prompt alone fills the cutoff
    from tokenskip import prompts

    messages = prompts.chat_messages("What is 2 + 2?") + [
        {"role": "assistant", "content": "2 + 2 = 4. $\\boxed{4}$"}
    ]
    expected = tokenize_example(tokenizer, messages, 64)
    assert first.input_ids.tolist() == expected.input_ids and first.labels.tolist() == expected.labels
    assert first.labels[: first.prompt_len].tolist() == [IGNORE_INDEX] * first.prompt_len
    tensors = collate([first, expected], pad_id=0)
    assert tensors["input_ids"][0].tolist() == tensors["input_ids"][1].tolist()


def test_tokenized_blocks_stay_small_however_many_rows_a_file_holds(tmp_path, tiny_causal_lm):
    """One task reads and tokenizes a whole file; its output must still reach the workers in blocks of
    one or two tokenize calls, not in blocks that grow with the file (a worker holds whole blocks)."""
    import pyarrow.parquet as pq
    import ray

    from tokenskip.train.config import StreamSettings
    from tokenskip.train.data import tokenized_dataset

    rows = 240
    path = tmp_path / "rows.parquet"
    long_answer = "Step 1: 48 / 2 = 24 clips in May. Step 2: 48 + 24 = 72 clips in total. " * 4
    pq.write_table(
        pa.table({"question": [f"What is {i} + 1?" for i in range(rows)], "response": [long_answer] * rows}),
        path,
        row_group_size=80,
    )
    # One CPU a task: two task processes on the 2 CPUs, not eight (each one imports transformers).
    stream = StreamSettings(rows_per_task=8, tokenize_num_cpus=1)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        ds = tokenized_dataset(
            DataSourceConfig(path=str(path), format="cot"), str(tiny_causal_lm), None, 64, stream
        )
        sizes = [
            entry.metadata.num_rows for bundle in ds.iter_internal_ref_bundles() for entry in bundle.blocks
        ]
    finally:
        ray.shutdown()
    assert sum(sizes) == rows
    assert max(sizes) <= 2 * stream.rows_per_task, sizes


def _config(**tldr_overrides) -> dict:
    settings = _tldr_settings().model_dump(mode="json")
    settings.update(tldr_overrides)
    return {
        "model": "m",
        "mode": "tldr",
        "tldr": settings,
        "scaling": {"num_workers": 2, "collective_timeout_s": 600},
        "checkpoint": {"storage_path": "/tmp/unused"},
    }


def test_dev_budget_is_checked_against_the_collective_timeout_at_config_time():
    # vLLM: every rank waits with ray.get, no collective open: any budget is fine.
    assert TrainConfig.model_validate(_config(backend="vllm", dev_timeout_s=7200)).tldr.dev_timeout_s == 7200
    with pytest.raises(
        ValueError, match="collective_timeout_s \\(600\\) must exceed tldr.dev_timeout_s \\(7200\\)"
    ):
        TrainConfig.model_validate(_config(backend="transformers", dev_timeout_s=7200))
    assert (
        TrainConfig.model_validate(_config(backend="transformers", dev_timeout_s=300)).tldr.backend
        == "transformers"
    )
    with pytest.raises(ValueError, match="max_model_len \\(4096\\) leaves no room"):
        TrainConfig.model_validate(_config(engine={"model": "m", "max_model_len": 4096}))
    # TL;DR's dev sampling is the default: temperature 0.7, up to 16k tokens.
    sampling = TrainConfig.model_validate(_config()).tldr.sampling
    assert (sampling.temperature, sampling.max_tokens) == (0.7, 16384)


def test_workers_that_take_every_cpu_fail_before_training_instead_of_waiting_for_data():
    from tokenskip.errors import UserError
    from tokenskip.train.job import check_room_for_data_tasks

    def config(resources, use_gpu=False):
        raw = {
            "model": "m",
            "data": {"path": "/tmp/unused.jsonl"},
            "scaling": {"num_workers": 2, "use_gpu": use_gpu, "resources_per_worker": resources},
            "checkpoint": {"storage_path": "/tmp/unused"},
        }
        return TrainConfig.model_validate(raw)

    # Two workers of one CPU on two CPUs: the tokenize tasks could never start (the run hung).
    with pytest.raises(UserError, match="take 2 of the cluster's 2 CPUs"):
        check_room_for_data_tasks(config({"CPU": 1}), 2.0)
    with pytest.raises(UserError, match="take 2 of the cluster's 2 CPUs"):
        check_room_for_data_tasks(config(None), 2.0)  # Ray Train's default: one CPU a CPU worker
    check_room_for_data_tasks(config({"CPU": 0.5}), 2.0)  # a CPU left for them
    check_room_for_data_tasks(config(None, use_gpu=True), 2.0)  # GPU workers take no CPU by default
    check_room_for_data_tasks(config({"CPU": 8, "GPU": 1}, use_gpu=True), 4.0)  # Ray waits for nodes
