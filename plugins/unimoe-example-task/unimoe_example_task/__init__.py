"""Example plug-in task for unimoe: text-to-sound-effects (``t2a``)."""
