"""DNSMOS (offline, ONNX models packaged in ``speechmos``): a non-intrusive MOS proxy.

The paper reports UTMOS, whose weights need a download; DNSMOS P.835 OVRL is the closest
offline substitute and is labelled as such in the results."""

from __future__ import annotations

import numpy as np


from .base import QualityPredictor, require


class DNSMOS(QualityPredictor):
    """DNSMOS P.835 (SIG, BAK, OVRL) and P.808 MOS via ``speechmos``; value = OVRL.

    Clips shorter than 9.01 s are tiled to that length by DNSMOS itself; longer clips are
    scored in 9 s windows with a 1 s hop and averaged."""

    sample_rate = 16000
    offline = True
    primary = "ovrl_mos"

    def __init__(self, personalized: bool = False) -> None:
        self._dnsmos = require("speechmos.dnsmos", "dnsmos", "pip install speechmos onnxruntime")
        self.model_type = "dnsmos_personalized" if personalized else "dnsmos"

    def describe(self) -> str:
        return f"DNSMOS P.835 ({self.model_type}, speechmos ONNX, packaged); reported value = OVRL"

    def predict_quality(self, wav: np.ndarray) -> dict[str, float]:
        out = self._dnsmos.run(np.clip(wav, -1.0, 1.0).astype(np.float32), self.sample_rate, model_type=self.model_type)
        return {k: float(out[k]) for k in ("ovrl_mos", "sig_mos", "bak_mos", "p808_mos")}
