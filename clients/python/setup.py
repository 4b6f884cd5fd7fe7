"""Generates the gRPC stubs of proto/visionserve/v1/vision.proto into the
build, never into the source tree: pip install ./clients/python from a
checkout of the repository (the proto is read from ../../proto)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        proto = os.path.join(PROTO_ROOT, "visionserve", "v1", "vision.proto")
        if not os.path.exists(proto):
            raise SystemExit(f"{proto} missing: build from a checkout of the visionserve repository")
        out = self.build_lib
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}", proto])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        open(os.path.join(out, "visionserve", "v1", "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
