"""MLServer custom runtimes for tests/test_kserve.py: serve kserve_function.affine and .step."""

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from kserve_function import affine, step


class AffineModel(MLModel):
    """One FP32/FP64 input ``x [N, ...]`` -> one output ``y [N, ...]``."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("y", affine(x))])


class StepModel(MLModel):
    """Inputs ``state [N, C, H, W]`` and ``params [N, 2]``, found by name -> ``next_state``."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {t.name: NumpyCodec.decode_input(t) for t in payload.inputs}
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            NumpyCodec.encode_output("next_state", step(inputs["state"], inputs["params"]))])
