"""Training and evaluation data: structure sets of the shared data folder and the protocol pools."""

from xtalsolve.data.structures import (
    PXRDNET_EXTRAS,
    PXRDNET_PAPER_N,
    Pool,
    StructureSet,
    StructureTensors,
    cache_dir,
    data_dir,
    dataset_names,
    evaluation_set,
    load_structures,
    load_tensors,
    training_pool,
    validation_set,
)

__all__ = [
    "PXRDNET_EXTRAS",
    "PXRDNET_PAPER_N",
    "Pool",
    "StructureSet",
    "StructureTensors",
    "cache_dir",
    "data_dir",
    "dataset_names",
    "evaluation_set",
    "load_structures",
    "load_tensors",
    "training_pool",
    "validation_set",
]
