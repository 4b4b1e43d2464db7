"""Will it work, and did it work: `dopsd precheck` (is the teacher context better than the prompt
alone, before training) and `dopsd eval` (base vs tuned models over seeds, with a report).

Modules: `encoders` (CLIP / DINOv2 from local paths, the pixel fallback), `metrics` (plain torch),
`generate` (batched, resumable generation in-process or on Ray actors), `run` (the two
procedures), `report` (HTML + results.json), `cli` (the subcommands).
"""
