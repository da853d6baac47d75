"""Generated protobuf/gRPC code for the kvrecall.v1 contract (proto/kvrecall/v1/kvrecall.proto).

The modules beside this file are produced by scripts/gen_proto.sh; edit the .proto, not them.
They are generated with protobuf 6.31 gencode so they load on every supported runtime; a
protobuf 7 runtime accepts one-major-older gencode with a warning, silenced here.
"""

import warnings

warnings.filterwarnings("ignore", message="Protobuf gencode version", category=UserWarning)
