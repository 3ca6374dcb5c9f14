"""The python-backend side of every model.py: pb_utils requests -> a service -> responses.

`pb_utils` exists only inside the Triton stub, so it is passed in; this module needs neither it nor torch.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .contract import RequestError


def triton_execute(pb_utils, service: Callable, requests: Sequence, input_names: Sequence[str]) -> list:
    """pb_utils requests -> service -> one InferenceResponse per request, in order.

    `pb_utils` is passed in because it only exists inside the Triton stub. A RequestError becomes that
    request's INVALID_ARG error, any other exception an INTERNAL one; the instance keeps serving.
    """
    def as_numpy(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def response(result):
        if isinstance(result, Exception):
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(result, RequestError)
                    else pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()])

    return [response(r) for r in service([{n: as_numpy(q, n) for n in input_names} for q in requests])]
