"""Data: sources (sources.py) -> DataBundle -> the memory or loader pipeline (pipelines.py), ordered
by the samplers (samplers.py), or a shard set streamed (shards.py, ordered by shard_plan.py). Augmentation is
toolkit/augment.py."""

from toolkit.data.pipelines import (DataBundle, FileImages, TensorImages, _choose_pipeline, _decode_all, _pass_through,
                                    build_loaders, num_steps, skip_batches)
from toolkit.data.samplers import EpochShuffle, SliceBatches
from toolkit.data.sources import (_conform, _digits, _imagefolder, _synthetic, _torchvision, _typical_side, build_data,
                                  split_indices)

__all__ = ["DataBundle", "EpochShuffle", "FileImages", "SliceBatches", "TensorImages", "build_data", "build_loaders",
           "num_steps", "skip_batches", "split_indices"]
