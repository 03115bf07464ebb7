"""The audio language model: backbone, delay pattern, text tokenizers, vision encoder and
task sequences. Import the submodules directly (``unimoe.model.transformer`` ...)."""
