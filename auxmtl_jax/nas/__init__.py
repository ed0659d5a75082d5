"""Auxi-NAS: the search space and genotype format (``genotype``), the LSTM controller (``controller``), its PPO
training (``ppo``), the reward (``reward``) and population training of candidates (``population``).

``random_genotypes`` is the CLI that writes random genotypes of a space as files.
``controller.sample`` / ``controller.score`` and ``ppo.update`` stay module-qualified: the bare names are too
generic for the package namespace.
"""

from auxmtl_jax.nas.controller import (Controller, ControllerNetwork, SampleResult, TokenLayout, genotype_from_tokens,
                                       init_controller_params, token_layout)
from auxmtl_jax.models.genotype import (AGGREGATORS, CROSS_TASK_INPUTS, FORMAT, OPERATIONS, TOKENS, CellSpace,
                                       Genotype, GenotypeError, basic_genotype, genotype_from_json_dict, load_genotype,
                                       output_locations, random_genotype)
from auxmtl_jax.nas.ppo import PPOConfig, PPOState, clipped_surrogate, init_ppo_state, ppo_loss, update_baseline

__all__ = ["AGGREGATORS", "CROSS_TASK_INPUTS", "FORMAT", "OPERATIONS", "TOKENS", "CellSpace", "Genotype",
           "GenotypeError", "basic_genotype", "genotype_from_json_dict", "load_genotype", "output_locations",
           "random_genotype", "Controller", "ControllerNetwork", "SampleResult", "TokenLayout", "genotype_from_tokens",
           "init_controller_params", "token_layout", "PPOConfig", "PPOState", "clipped_surrogate", "init_ppo_state",
           "ppo_loss", "update_baseline"]
