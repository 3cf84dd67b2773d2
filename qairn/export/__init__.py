"""Deployment: ONNX export, ONNX Runtime and TensorRT backends (`qairn export`, Restorer backends).

    qairn export onnx WEIGHTS -o model.onnx [--maps] [--fp16 [--io fp16]] [--static N,H,W]
    qairn export tensorrt WEIGHTS [-o model.engine] [--shape 4,512,512 | --dynamic] [--precision fp16]
    qairn.Restorer(weights, backend="onnxruntime", threads=2)            # CPU servers
    qairn.Restorer(weights, backend="tensorrt", precision="fp16", engine="model.engine")

Modules: onnx_export (graph contract, fp16 islands, verification), ort_backend, trt_engine (build,
engine cache, validation), trt_backend (runtime on torch CUDA tensors), shapes (static-shape plans),
cache (cache folder, digests, atomic writes), cli.
"""
