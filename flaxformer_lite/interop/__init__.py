"""Exchange weights with other ecosystems: HuggingFace model folders (`hf`), the CLI `convert`.

The only package that knows HF tensor names and layouts; models never import it.
"""
