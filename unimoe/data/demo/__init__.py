"""The offline demo corpus: synthetic speech (espeak-ng), music (mido + fluidsynth) and
video (numpy) with transcripts and captions, so the whole pipeline runs without downloads.
Entry point: :func:`unimoe.data.demo.build.build_demo_corpus`.
"""
