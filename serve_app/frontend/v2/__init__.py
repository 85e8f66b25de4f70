"""Open Inference (V2): the codec that REST and gRPC share (:mod:`.codec`: tensors to internal
requests, results to tensors), the gRPC servicer (:mod:`.servicer`) and the generated messages
and stubs (:mod:`.proto`, made by ``scripts/gen_proto.py``). No FastAPI here.
"""

from serve_app.frontend.v2.servicer import add_inference_servicer

__all__ = ["add_inference_servicer"]
