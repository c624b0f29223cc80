"""NVIDIA DALI (nvidia-dali-cuda130) installs and runs on CPU: its webdataset reader and CPU JPEG
decoder read our shards and agree with PIL pixel for pixel."""

import io
import tarfile

import numpy as np
from PIL import Image


def test_dali_cpu_reads_demo_shards_like_pil(demo_shards):
    from nvidia.dali import fn, pipeline_def, types

    _, _, d = demo_shards
    path = f"{d}/val-000000.tar"

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)  # device_id=None: CPU only
    def pipe():
        jpg, txt = fn.readers.webdataset(paths=[path], ext=["jpg", "txt"], missing_component_behavior="error",
                                         random_shuffle=False)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), txt

    p = pipe()
    p.build()
    images, captions = p.run()
    with tarfile.open(path) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for i in range(8):
        ref = np.asarray(Image.open(io.BytesIO(members[f"val-{i:08d}.jpg"])).convert("RGB"))
        np.testing.assert_array_equal(np.array(images[i]), ref)
        assert bytes(np.array(captions[i])).decode() == members[f"val-{i:08d}.txt"].decode()
