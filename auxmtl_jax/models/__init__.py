"""Model library: encoders, decoders, auxiliary modules and their composition (see ``networks.build_model``)."""

from auxmtl_jax.models.auxiliary import (ADAPTORS, AGGREGATES, OPERATIONS, RESOLUTIONS, AuxiliaryModule,
                                         DeepSupervisionHeads)
from auxmtl_jax.models.decoders import DECODERS, DEFAULT_HEAD_CHANNELS, DEFAULT_OUTPUT_STRIDE
from auxmtl_jax.models.encoders import ENCODERS, OUTPUT_STRIDES, StageSpec, encoder_features, encoder_stages
from auxmtl_jax.models.networks import DTYPES, ModelOutputs, MultiTaskModel, MultiTaskNet, build_model

__all__ = [
    "ADAPTORS", "AGGREGATES", "DECODERS", "DEFAULT_HEAD_CHANNELS", "DEFAULT_OUTPUT_STRIDE", "DTYPES", "ENCODERS",
    "OPERATIONS", "OUTPUT_STRIDES", "RESOLUTIONS", "AuxiliaryModule", "DeepSupervisionHeads", "ModelOutputs",
    "MultiTaskModel", "MultiTaskNet", "StageSpec", "build_model", "encoder_features", "encoder_stages",
]
