"""On-disk formats dcpio reads and writes: torch.save records and safetensors (plus the Hugging Face layout)."""
