"""Post-training (AFM_SPEC section 5): SFT, verifiable-instruction data, the reward model,
iTeC rejection sampling and MDLOO RLHF, each a recipe (data + objective) on the one trainer."""
