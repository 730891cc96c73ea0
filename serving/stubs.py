"""The generated protobuf/gRPC modules, regenerated first if missing or stale.

Import the API from here, never from `serving._proto` directly:
    from serving.stubs import pb, pb_grpc
"""

from __future__ import annotations

from serving import proto_build

# Without proto/ (an installed wheel carries only the generated package) there is nothing to
# compare against: use the stubs as built.
if proto_build.proto_files() and not proto_build.is_current():
    proto_build.build()

from serving._proto.hyperdreambooth.v1 import service_pb2 as pb  # noqa: E402
from serving._proto.hyperdreambooth.v1 import service_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PersonalizationService"].full_name

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
