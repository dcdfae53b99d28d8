"""This rank's batches, with the stream position that makes a resume exact."""
from __future__ import annotations

from omegaconf import DictConfig

from data_shards.errors import NoValidSamples
from data_shards.loader import make_loader
from data_shards.options import StreamOptions


class DataFeed:
    """This rank's batches, and where in the stream each of its loader workers stands.

    Each batch carries its producer's position; saving the last position of every worker
    (plus which worker comes next) is what lets a resumed run see exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, cfg: DictConfig, shards: list[str], dist_info, step: int, state: dict | None):
        workers = max(1, cfg.data.num_workers)
        same_layout = state is not None and state.get("world_size") == dist_info.world_size \
            and state.get("num_workers") == workers
        self.positions = dict(state["positions"]) if same_layout else {}
        if state is not None and not same_layout and dist_info.is_main:
            print("[gentrain] world size or loader workers changed since the checkpoint: "
                  "the data stream restarts with a new order (counters continue)", flush=True)
        self.world_size, self.num_workers = dist_info.world_size, workers
        # Loader workers hand out batches in strict rotation; after `step` batches the next one
        # is due from logical worker step % workers, so the fresh loader's worker 0 plays it.
        seed = cfg.run.seed if same_layout or state is None else cfg.run.seed + 7919 * step
        options = StreamOptions(batch_size=cfg.data.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                                num_workers=cfg.data.num_workers, seed=seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                channels=cfg.data.channels, image_size=cfg.data.image_size,
                                channels_last=cfg.trainer.channels_last, start_positions=self.positions,
                                worker_offset=step % workers)
        loader = make_loader(shards, options)
        self._batches = iter(loader)

    def next(self) -> dict:
        try:
            batch = next(self._batches)
        except RuntimeError as err:
            # A loader worker's exception arrives re-wrapped with its traceback in the text.
            if "NoValidSamples" in str(err) or isinstance(err, NoValidSamples):
                reason = next((ln for ln in str(err).splitlines() if "no valid samples" in ln), str(err))
                raise NoValidSamples(reason.split("NoValidSamples: ")[-1].strip()) from None
            raise
        if "__position__" in batch:
            self.positions[int(batch["__worker__"])] = batch["__position__"]
        return batch

    def state(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "positions": self.positions}
