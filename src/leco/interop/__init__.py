"""Working with other tools' files: baking LoRAs into checkpoints, converting other trainers' LoRAs."""
