"""ZoomWorld: procedurally generated high-resolution scenes whose answer hides in one small panel.

A scene is a cluttered canvas with a few framed panels; the question names one panel by its
unique frame colour ("the panel with the red border") and asks about its content in one of six
dimensions. The record's box is that panel, in pixels.
"""

from zoomless.world.contact_sheet import contact_sheet
from zoomless.world.dimensions import COLORS, DIMENSIONS, FRAME_COLORS, PANEL_FILL, draw_content, value_pool
from zoomless.world.generate import generate_sample, generate_split, plan_sample, scene_seed
from zoomless.world.scene import Panel, Scene, parse_panels, plan_scene, render_scene

__all__ = [
    "COLORS",
    "DIMENSIONS",
    "FRAME_COLORS",
    "PANEL_FILL",
    "Panel",
    "Scene",
    "contact_sheet",
    "draw_content",
    "generate_sample",
    "generate_split",
    "plan_sample",
    "parse_panels",
    "plan_scene",
    "render_scene",
    "scene_seed",
    "value_pool",
]
