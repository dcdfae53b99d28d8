"""ZeRO optimizer state across a change of world size: every rank's slice gathered, then cut anew.

ZeRO-1/2 (and DeepSpeed's BF16 optimizer) save one file per rank, `[bf16_]zero_pp_rank_<r>_...
optim_states.pt`: that rank's slice of each param group's flat fp32 master weights and of AdamW's
exp_avg / exp_avg_sq, the last rank's slice padded so that all are the same size. Joined in rank
order with the padding stripped, the slices are the same flat vectors at any world size (ZeRO
flattens a group's parameters in one fixed order; only the tail padding depends on the number of
ranks), so a run of another size cuts its own slices from them and loads those through the
optimizer's own `load_state_dict`, the path a same-size resume takes.

DeepSpeed's own routes do not serve: its engine refuses ZeRO optimizer states saved at another DP
world size (`elastic_checkpoint` included), and its universal checkpoint needs an offline
conversion (ds_to_universal) plus `checkpoint.load_universal` set before the engine is built.
Every rank reads every rank's file: fine for the networks trained here (DeepSpeed's elastic
loading does the same).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

# DeepSpeed's key names (deepspeed.checkpoint.constants), spelled out so that reading a checkpoint
# does not import DeepSpeed.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
FP32_PARTITIONS = "single_partition_of_fp32_groups"
GROUP_PADDINGS = "group_paddings"
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"

_ELASTIC = "elastic-format ZeRO state (zero_optimization.elastic_checkpoint) is not supported"
_PARTITION_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def partition_files(state_dir: Path) -> list[Path]:
    """An engine's per-rank optimizer files in rank order; empty when its optimizer state is whole
    (ZeRO-0: it lives in mp_rank_00_model_states.pt)."""
    found = {}
    for f in Path(state_dir).glob("*zero_pp_rank_*_optim_states.pt"):
        match = _PARTITION_FILE.fullmatch(f.name)
        if match:
            found[int(match.group(1))] = f
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{state_dir}: optimizer partitions of ranks {sorted(found)}, not 0..{len(found) - 1}")
    return [found[rank] for rank in range(len(found))]


def read_partitions(state_dir: Path) -> list[dict]:
    """Every rank's saved optimizer state dict, in rank order."""
    from trainers.runtime.safe_load import safe_torch_load

    return [safe_torch_load(f, map_location="cpu")[OPTIMIZER_STATE_DICT] for f in partition_files(state_dir)]


def _lean_length(partition: dict, group: int) -> int:
    """How much of a rank's slice of `group` is real (the rest is padding to equal slices)."""
    fp32 = partition[FP32_PARTITIONS][group]
    # ZeRO strips the padding off its fp32 slice when saving; the BF16 optimizer does not.
    return fp32.numel() if ZERO_STAGE in partition else fp32.numel() - partition[GROUP_PADDINGS][group]


def _group_state(partition: dict, group: int) -> dict:
    """The base (torch) optimizer's state of a rank's flat parameter for `group`."""
    base = partition[BASE_OPTIMIZER_STATE]
    if not isinstance(base, dict):
        raise ValueError(_ELASTIC)
    return base["state"].get(base["param_groups"][group]["params"][0], {})


def gather(partitions: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Per param group, the whole flat state over all ranks, padding stripped: "fp32" (the master
    weights) and every per-element optimizer state (exp_avg, exp_avg_sq); scalar state (AdamW's
    step) as saved, after checking that every rank saved the same."""
    groups = []
    for i in range(len(partitions[0][FP32_PARTITIONS])):
        lean = [_lean_length(p, i) for p in partitions]
        whole = {"fp32": torch.cat([p[FP32_PARTITIONS][i][:n] for p, n in zip(partitions, lean)])}
        states = [_group_state(p, i) for p in partitions]
        for key, value in states[0].items():
            if torch.is_tensor(value) and value.dim() > 0:
                whole[key] = torch.cat([s[key][:n] for s, n in zip(states, lean)])
            elif all(_same(s[key], value) for s in states):
                whole[key] = value
            else:
                raise ValueError(f"optimizer state '{key}' of param group {i} differs between ranks")
        groups.append(whole)
    return groups


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


def _live_layout(optimizer) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """The optimizer's fp32 slices on this rank, its group paddings, and each group's real length."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2 (DeepSpeedZeroOptimizer)
        lengths = [sum(p.numel() for p in params) + sum(pads) for params, pads in
                   zip(optimizer.round_robin_bit16_groups, optimizer.round_robin_bit16_padding)]
        return optimizer.single_partition_of_fp32_groups, optimizer.groups_padding, lengths
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        lengths = [sum(p.numel() for p in params) for params in optimizer.bf16_groups]
        return optimizer.fp32_groups_flat_partition, optimizer.group_paddings, lengths
    raise ValueError(f"{type(optimizer).__name__} keeps no ZeRO partitions")


def why_not(partitions: list[dict], optimizer) -> str | None:
    """Why these saved partitions cannot be re-cut for this optimizer; None when they can.
    Reads only lengths and layouts: nothing is gathered yet."""
    if not all(isinstance(p[BASE_OPTIMIZER_STATE], dict) for p in partitions):
        return _ELASTIC
    try:
        slices, _, lengths = _live_layout(optimizer)
    except ValueError as err:
        return str(err)
    groups = range(len(partitions[0][FP32_PARTITIONS]))
    if getattr(optimizer, "round_robin_gradients", False):
        return "zero_optimization.round_robin_gradients orders parameters by rank"
    saved_alignment = partitions[0].get(PARAM_ALIGNMENT_PADDINGS)
    live_alignment = getattr(optimizer, "round_robin_bit16_padding", saved_alignment)
    if saved_alignment is not None and saved_alignment != live_alignment:
        return "zero_optimization.parameter_alignment differs from the checkpoint's"
    if [sum(_lean_length(p, i) for p in partitions) for i in groups] != lengths or len(slices) != len(groups):
        return "the parameter groups differ from the checkpoint's"
    return None


def _cut(flat: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """flat[start:start+size], zero-padded to `size` (the last rank's tail), as ZeRO pads it."""
    out = torch.zeros(size, dtype=flat.dtype)
    piece = flat[start:start + size]
    out[:piece.numel()] = piece
    return out


def state_for_rank(partitions: list[dict], optimizer, rank: int, world: int) -> dict:
    """The optimizer state dict this rank would have saved had the run always had this size."""
    slices, paddings, _ = _live_layout(optimizer)
    template = partitions[0]
    param_groups = template[BASE_OPTIMIZER_STATE]["param_groups"]
    state, fp32 = {}, []
    for i, (whole, live) in enumerate(zip(gather(partitions), slices)):
        size = live.numel()  # ZeRO's slices are equal: the flat group is padded to a multiple of the world size
        fp32.append(_cut(whole.pop("fp32"), rank * size, size))
        state[param_groups[i]["params"][0]] = {
            key: _cut(value, rank * size, size) if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in whole.items()}
    return {**template, BASE_OPTIMIZER_STATE: {"state": state, "param_groups": param_groups},
            FP32_PARTITIONS: fp32, GROUP_PADDINGS: list(paddings), PARTITION_COUNT: [world] * len(slices)}


def load_resharded(engine, partitions: list[dict]) -> None:
    """Give the engine's ZeRO optimizer the slices of `partitions` (saved at any world size) that
    this rank owns now: fp32 master weights, exp_avg, exp_avg_sq, step, clipping and loss scale."""
    import deepspeed.comm as dist

    optimizer = engine.optimizer
    rank, world = dist.get_rank(group=optimizer.dp_process_group), dist.get_world_size(group=optimizer.dp_process_group)
    state_list = [None] * world  # the optimizer reads only its own rank's entry
    state_list[rank] = state_for_rank(partitions, optimizer, rank, world)
    optimizer.load_state_dict(state_list, load_optimizer_states=True,
                              load_from_fp32_weights=engine.zero_load_from_fp32_weights())
