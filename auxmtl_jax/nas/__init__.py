"""Auxi-NAS: the searchable auxiliary module's space and genotype format (``genotype``)."""

from auxmtl_jax.nas.genotype import (AGGREGATORS, FORMAT, OPERATIONS, TOKENS, CellSpace, Genotype, GenotypeError,
                                     basic_genotype, genotype_from_json_dict, load_genotype, output_locations,
                                     random_genotype)

__all__ = ["AGGREGATORS", "FORMAT", "OPERATIONS", "TOKENS", "CellSpace", "Genotype", "GenotypeError",
           "basic_genotype", "genotype_from_json_dict", "load_genotype", "output_locations", "random_genotype"]
