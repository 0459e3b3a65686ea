"""Data files shipped with afmkit (IFEval prompts, hh-rlhf safety prompts, a public-domain text),
each with its licence; see README.md here. Locate them with ``afmkit.files.packaged_data``."""
