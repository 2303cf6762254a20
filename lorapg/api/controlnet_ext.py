"""The ControlNet extension's own routes (``/controlnet/...``), which clients such as webuiapi call
before sending units in txt2img's ``alwayson_scripts``: the models (as ``name [hash]``), the
preprocessors ("modules") and the API version."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess, basic_auth_check
from lorapg.api.errors import A1111Route
from lorapg.diffusion.controlnet_models import ControlNetLibrary
from lorapg.limits import CONTROL_PREPROCESSORS
from lorapg.services.a1111_controlnet import EXTENSION_API_VERSION, module_list


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model_list": ["control_v11p_sd15_canny [d14c016b]", "xl_depth [39c49e13]"]}]}
    )

    model_list: list[str] = Field(description="models in MODELS_DIR/controlnet, as 'name [hash]'")


class ModuleList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"module_list": list(CONTROL_PREPROCESSORS)}]})

    module_list: list[str] = Field(description="the preprocessors this app runs")


class Version(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"version": EXTENSION_API_VERSION}]})

    version: int


def controlnet_router(library: ControlNetLibrary, access: ApiAccess) -> APIRouter:
    router = APIRouter(
        prefix="/controlnet",
        tags=["A1111 ControlNet extension"],
        route_class=A1111Route,
        dependencies=[Depends(basic_auth_check(access.users))],
    )

    @router.get("/model_list", response_model=ModelList)
    def model_list() -> ModelList:
        return ModelList(model_list=[info.title for info in library.scan()])  # read afresh: new files appear

    @router.get("/module_list", response_model=ModuleList)
    def modules() -> ModuleList:
        return ModuleList(module_list=module_list())

    @router.get("/version", response_model=Version)
    def version() -> Version:
        return Version(version=EXTENSION_API_VERSION)

    return router
