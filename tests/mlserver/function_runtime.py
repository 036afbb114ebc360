"""MLServer custom runtime: serves a NumPy function named in the model's settings.

model-settings.json: ``"implementation": "function_runtime.FunctionModel"`` and
``"parameters": {"extra": {"function": "module:name"}}`` (``module`` importable from MLServer's
work folder). The function gets the request's tensors as arrays, in the order of the model's
declared inputs when the request names exactly those (the order a client sends them in does not
matter then), else in the order sent; its one array answers as the first declared output.
"""

import importlib

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class FunctionModel(MLModel):
    """``parameters.extra.function`` (``module:name``) as a KServe v2 model."""

    async def load(self) -> bool:
        module, _, name = self.settings.parameters.extra["function"].partition(":")
        self.function = getattr(importlib.import_module(module), name)
        self.input_names = [t.name for t in self.settings.inputs or []]
        self.output_name = self.settings.outputs[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        sent = [(t.name, NumpyCodec.decode_input(t)) for t in payload.inputs]
        args = [array for _, array in sent]
        if sorted(name for name, _ in sent) == sorted(self.input_names):
            args = [dict(sent)[name] for name in self.input_names]
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self.output_name, self.function(*args))])
