"""Make examples/sample_q10.jpg: a synthetic scene (no third-party content) saved at JPEG quality 10."""

from pathlib import Path

import cv2
import numpy as np

rng = np.random.default_rng(7)
h, w = 320, 480
yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
img = np.stack([90 + 80 * xx / w, 120 + 60 * yy / h, 200 - 100 * xx / w], axis=2)  # smooth sky
img[200:] = np.stack([60 + 30 * np.sin(xx[200:] / 9), 110 + 20 * np.sin(yy[200:] / 5), 50 + 0 * xx[200:]], 2)
img = img.astype(np.uint8).copy()
cv2.circle(img, (380, 80), 45, (40, 200, 250), -1, cv2.LINE_AA)
for i in range(12):  # thin lines and edges: where JPEG rings and blocks
    x = 20 + 30 * i
    cv2.line(img, (x, 120), (x + 15, 300), (20, 20, 20), 1 + i % 3, cv2.LINE_AA)
cv2.rectangle(img, (250, 150), (350, 260), (200, 60, 60), -1)
cv2.putText(img, "qairn", (40, 90), cv2.FONT_HERSHEY_SIMPLEX, 2.2, (255, 255, 255), 4, cv2.LINE_AA)
img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)  # a little texture
out = Path(__file__).with_name("sample_q10.jpg")
cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 10])
print(out, out.stat().st_size, "bytes")
