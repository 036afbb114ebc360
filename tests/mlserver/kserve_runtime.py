"""MLServer custom runtime for tests/test_kserve.py: serves kserve_function.affine."""

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from kserve_function import affine


class AffineModel(MLModel):
    """One FP32/FP64 input ``x [N, ...]`` -> one output ``y [N, ...]``."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("y", affine(x))])
