"""Static checks of the Slicer module files (no Slicer application needed).

NoduleMTL.py imports ``qt`` and ``slicer.ScriptedLoadableModule`` and so cannot be imported
here; it is inspected with ``ast``.  The .ui file is parsed as XML, the CMake files as text
(their globs are evaluated the way CMake would).
"""

from __future__ import annotations

import ast
import fnmatch
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "NoduleMTL"
LIB_DIR = REPO / "NoduleMTLLib"
RESOURCES_DIR = REPO / "Resources"
MODULE_PY = MODULE_DIR / "NoduleMTL.py"
MRML_PY = MODULE_DIR / "NoduleMTLMRML.py"
#: The MRML layer: the entry module and the three it re-exports (nodes, scene, export).
MRML_FILES = sorted(MODULE_DIR.glob("NoduleMTLMRML*.py"))
UI_FILE = RESOURCES_DIR / "UI" / "NoduleMTL.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"

#: Widget classes that need the scene (must get it through mrmlSceneChanged).
MRML_WIDGET_CLASSES = {"qMRMLNodeComboBox", "qMRMLTableView", "qSlicerMarkupsPlaceWidget",
                       "qMRMLSegmentsTableView", "qMRMLSubjectHierarchyTreeView"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _ignored(path: Path) -> bool:
    return any(part == "__pycache__" or part.startswith(".") for part in path.parts) or path.suffix == ".pyc"


def _files_under(folder: Path, pattern: str = "*") -> set[str]:
    """Files under ``folder`` (recursive), relative to the repository root."""
    return {p.relative_to(REPO).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and not _ignored(p.relative_to(REPO))}


# ---------------------------------------------------------------------------
# .ui file
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in root.iter("widget")}


def _widget_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def _parameter_names(root: ET.Element) -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    out = {}
    for widget in root.iter("widget"):
        prop = _widget_property(widget, "SlicerParameterName")
        if prop is not None:
            out[prop.findtext("string")] = widget
    return out


def _parameter_node_fields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class in NoduleMTL.py."""
    source = MODULE_PY.read_text(encoding="utf-8")
    for node in ast.walk(_tree(MODULE_PY)):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
                or (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "parameterNodeWrapper")
                for d in node.decorator_list):
            return {stmt.target.id: ast.get_source_segment(source, stmt.annotation)
                    for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in NoduleMTL.py")


def test_ui_is_valid_qt_designer_xml(ui_root):
    assert ui_root.tag == "ui"
    top = ui_root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "NoduleMTL"
    sections = {_widget_property(w, "text").findtext("string")
                for w in ui_root.iter("widget") if w.get("class") == "ctkCollapsibleButton"}
    assert {"Inputs", "Settings", "Results"} <= sections
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate object names"
    declared = {cw.findtext("class") for cw in ui_root.iter("customwidget")}
    used = {w.get("class") for w in ui_root.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"custom widgets used but not declared: {custom - declared}"


def test_every_slicer_parameter_name_is_a_parameter_node_field(ui_root):
    fields = _parameter_node_fields()
    assert {"inputVolume", "points", "networks", "device", "outputSegmentation", "outputTable"} <= set(fields)
    bound = _parameter_names(ui_root)
    assert bound, "no widget is bound through SlicerParameterName"
    unknown = set(bound) - set(fields)
    assert not unknown, f"SlicerParameterName(s) not in NoduleMTLParameterNode: {unknown}"
    for name, widget in bound.items():
        annotation = fields[name]
        node_class = re.fullmatch(r"(?:Optional\[)?(vtkMRML\w+Node)\]?", annotation)
        if node_class:  # node fields -> node combo box listing that class
            assert widget.get("class") == "qMRMLNodeComboBox", name
            node_types = [s.text for s in _widget_property(widget, "nodeTypes").iter("string")]
            assert node_class.group(1) in node_types, (name, node_types)
        elif "Choice" in annotation:  # str with Choice -> plain QComboBox (QComboBoxToStringableConnector)
            assert widget.get("class") == "QComboBox", name


def test_ui_widgets_used_by_the_module_exist(ui_root):
    """Every ``self.ui.<name>`` in NoduleMTL.py names a widget of the .ui file."""
    widgets = set(_ui_widgets(ui_root))
    used = set()
    for node in ast.walk(_tree(MODULE_PY)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "NoduleMTL.py does not use self.ui"
    assert used <= widgets, f"widgets used in NoduleMTL.py but missing in the .ui: {used - widgets}"


def test_mrml_widgets_receive_the_scene(ui_root):
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {w.get("name") for w in ui_root.iter("widget") if w.get("class") in MRML_WIDGET_CLASSES}
    assert mrml_widgets
    assert mrml_widgets <= receivers, f"not connected to mrmlSceneChanged: {mrml_widgets - receivers}"


#: Widgets of the panel the module relies on, with their classes.
PANEL_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox", "pointsSelector": "qMRMLNodeComboBox",
    "pointsPlaceWidget": "qSlicerMarkupsPlaceWidget", "networksListWidget": "QListWidget",
    "deviceComboBox": "QComboBox", "importModelButton": "QPushButton", "applyButton": "QPushButton",
    "findNodulesButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
    "outputSegmentationSelector": "qMRMLNodeComboBox", "outputTableSelector": "qMRMLNodeComboBox",
    "malignancyLabel": "QLabel", "legendLabel": "QLabel", "resultsTableView": "qMRMLTableView",
    "reclassifyButton": "QPushButton", "exportTrainingButton": "QPushButton",
    "exportReportButton": "QPushButton", "lungRadsLabel": "QLabel",
}

#: Signals the module connects to, per widget class (Qt / CTK / MRML widget API).
KNOWN_SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QListWidget": {"itemChanged(QListWidgetItem*)", "currentRowChanged(int)"},
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)"},
    "qMRMLTableView": {"clicked(QModelIndex)", "doubleClicked(QModelIndex)", "selectionChanged()"},
}


def _class_def(name: str) -> ast.ClassDef:
    [cls] = [n for n in _tree(MODULE_PY).body if isinstance(n, ast.ClassDef) and n.name == name]
    return cls


def test_panel_widgets_have_the_expected_classes(ui_root):
    widgets = _ui_widgets(ui_root)
    for name, cls in PANEL_WIDGETS.items():
        assert name in widgets, f"{name} missing in the .ui"
        assert widgets[name].get("class") == cls, (name, widgets[name].get("class"))
    # network and device lists are filled and synchronised by the widget, not by connectGui
    for name in ("networksListWidget", "deviceComboBox"):
        assert _widget_property(widgets[name], "SlicerParameterName") is None, name


def test_signal_connections_name_known_signals_and_existing_slots(ui_root):
    """``self.ui.<w>.connect("<signal>", self.<slot>)``: the signal exists for the widget's
    class and the slot is a method of the widget class."""
    widgets = _ui_widgets(ui_root)
    widget_methods = {n.name for n in _class_def("NoduleMTLWidget").body if isinstance(n, ast.FunctionDef)}
    connections = []
    for node in ast.walk(_class_def("NoduleMTLWidget")):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui"):
            widget, (signal, slot) = node.func.value.attr, node.args
            connections.append(widget)
            cls = widgets[widget].get("class")
            assert signal.value in KNOWN_SIGNALS[cls], (widget, cls, signal.value)
            assert isinstance(slot, ast.Attribute) and slot.attr in widget_methods, (widget, ast.dump(slot))
    assert {"applyButton", "findNodulesButton", "importModelButton", "networksListWidget", "deviceComboBox",
            "resultsTableView", "reclassifyButton", "exportTrainingButton", "exportReportButton"} <= set(connections)


def test_parameter_node_attributes_exist():
    """Attributes read or written on the parameter node (``p.x``, ``self._parameterNode.x``)
    are fields of NoduleMTLParameterNode (or the wrapper's own API)."""
    fields = set(_parameter_node_fields())
    wrapper_api = {"connectGui", "disconnectGui", "parameterNode"}
    used = set()
    for node in ast.walk(_class_def("NoduleMTLWidget")):
        if isinstance(node, ast.Attribute):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "p") or (
                    isinstance(base, ast.Attribute) and base.attr == "_parameterNode"
                    and isinstance(base.value, ast.Name) and base.value.id == "self"):
                used.add(node.attr)
    assert {"networks", "device", "inputVolume", "points"} <= used
    assert used <= fields | wrapper_api, used - fields - wrapper_api


def test_module_uses_only_existing_library_and_mrml_functions():
    """``_runner().<name>`` / ``_analysis().<name>`` (or ``analysis.<name>``) / ``_text().<name>`` /
    ``NoduleMTLMRML.<name>`` name functions that exist in
    NoduleMTLLib/apps/runner.py, NoduleMTLLib/service/analysis.py, NoduleMTLText.py and NoduleMTLMRML.py."""
    sources = {"_runner": LIB_DIR / "apps" / "runner.py", "_analysis": LIB_DIR / "service" / "analysis.py",
               "_worker": LIB_DIR / "apps" / "worker.py",
               "_text": MODULE_DIR / "NoduleMTLText.py", "NoduleMTLMRML": MRML_PY}
    aliases = {"runner": "_runner", "analysis": "_analysis"}  # runner = _runner(), analysis = _analysis()
    used = {k: set() for k in sources}
    for node in ast.walk(_tree(MODULE_PY)):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) in sources:
                used[node.value.func.id].add(node.attr)
            elif isinstance(node.value, ast.Name) and node.value.id in aliases:
                used[aliases[node.value.id]].add(node.attr)
            elif isinstance(node.value, ast.Name) and node.value.id == "NoduleMTLMRML":
                used["NoduleMTLMRML"].add(node.attr)
    assert {"AnalysisProcess"} <= used["_runner"]
    assert {"analyze", "network_choices", "detector_status"} <= used["_analysis"]
    assert {"summary_html", "status_text"} <= used["_text"]
    assert {"reclassify_segment", "export_segment_for_training", "add_result_to_scene", "export_report",
            "scan_lung_rads_text"} <= used["NoduleMTLMRML"]
    for key, path in sources.items():
        names = _top_level_names(path)
        assert used[key] <= names, (key, used[key] - names)


def test_module_compiles():
    import py_compile

    py_compile.compile(str(MODULE_PY), doraise=True, cfile=str(Path(__import__("tempfile").mkdtemp()) / "m.pyc"))


# ---------------------------------------------------------------------------
# Python sources
# ---------------------------------------------------------------------------

def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, [imported names]) for every import statement, at any depth."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _lib_module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in _tree(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("path", [MODULE_PY, *(p for p in MRML_FILES if p != MRML_PY)], ids=lambda p: p.name)
def test_imports_of_nodulemtllib_exist(path):
    """Only existing NoduleMTLLib modules and names are imported (at any depth)."""
    checked = 0
    for module, names in _imports(path):
        if module.split(".")[0] != "NoduleMTLLib":
            continue
        module_file = _lib_module_file(module)
        assert module_file is not None, f"{path.name} imports missing module {module}"
        defined = _top_level_names(module_file)
        for name in names:
            if _lib_module_file(f"{module}.{name}") is None:  # not a submodule: must be defined there
                assert name in defined, f"{path.name}: {module} has no '{name}'"
        checked += 1
    assert checked


def test_logic_calls_the_analysis_service_with_its_signature():
    """NoduleMTL.py calls ``analysis.analyze(ct, points, network_ids=, device=, progress=, ...)``."""
    funcs = {n.name: n for n in _tree(LIB_DIR / "service" / "analysis.py").body if isinstance(n, ast.FunctionDef)}
    assert "analyze" in funcs
    params = {a.arg for a in funcs["analyze"].args.args + funcs["analyze"].args.kwonlyargs}
    calls = [n for n in ast.walk(_tree(MODULE_PY)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "analyze"]
    assert calls, "NoduleMTL.py never calls analysis.analyze"
    for call in calls:
        keywords = {k.arg for k in call.keywords}
        assert keywords <= params, keywords - params
        assert len(call.args) == 2


@pytest.mark.parametrize("path", MRML_FILES, ids=lambda p: p.name)
def test_mrml_layer_is_gui_free(path):
    """NoduleMTLMRML*.py import no qt/ctk and touch no slicer.app / modules / mrmlScene."""
    for module, _names in _imports(path):
        assert module.split(".")[0] not in {"qt", "ctk", "PythonQt"}, module
        assert not module.startswith("slicer.ScriptedLoadableModule"), module
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            assert node.attr not in {"app", "modules", "mrmlScene", "qMRMLUtils"}, f"slicer.{node.attr}"


def test_mrml_layer_is_split_by_responsibility():
    """NoduleMTLMRML.py is the thin entry point (re-exports only); nodes <- scene <- export import one way."""
    assert [p.name for p in MRML_FILES] == ["NoduleMTLMRML.py", "NoduleMTLMRMLExport.py", "NoduleMTLMRMLNodes.py",
                                            "NoduleMTLMRMLScene.py"]
    entry = _tree(MRML_PY)
    assert not [n for n in entry.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], "logic belongs in the split modules"
    order = ["NoduleMTLMRMLNodes", "NoduleMTLMRMLScene", "NoduleMTLMRMLExport"]
    for i, name in enumerate(order):
        imported = {m for m, _ in _imports(MODULE_DIR / f"{name}.py") if m.startswith("NoduleMTLMRML")}
        assert imported <= set(order[:i]), (name, imported)
        assert len((MODULE_DIR / f"{name}.py").read_text(encoding="utf-8").splitlines()) < 700, name


def test_module_classes_follow_the_template():
    classes = {n.name: n for n in _tree(MODULE_PY).body if isinstance(n, ast.ClassDef)}
    bases = {name: {getattr(b, "id", getattr(b, "attr", "")) for b in c.bases} for name, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["NoduleMTL"]
    assert {"ScriptedLoadableModuleWidget", "VTKObservationMixin"} <= bases["NoduleMTLWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["NoduleMTLLogic"]
    assert "ScriptedLoadableModuleTest" in bases["NoduleMTLTest"]
    logic = {n.name: n for n in classes["NoduleMTLLogic"].body if isinstance(n, ast.FunctionDef)}
    args = [a.arg for a in logic["process"].args.args]
    assert args[:3] == ["self", "inputVolume", "pointsNode"]
    assert {"networks", "device", "progressCallback", "waitForCompletion"} <= set(args)
    assert {"setupPythonRequirements", "startAnalysis", "finishAnalysis", "findNodules", "importModel"} <= set(logic)
    test = {n.name: n for n in classes["NoduleMTLTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest", "test_NoduleMTL1", "test_NoduleMTL2_background", "test_NoduleMTL3_cancel"} <= set(test)
    run_test_calls = {n.func.attr for n in ast.walk(test["runTest"])
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {name for name in test if name.startswith("test_")} <= run_test_calls, "runTest must run every test_*"
    widget = {n.name for n in classes["NoduleMTLWidget"].body if isinstance(n, ast.FunctionDef)}
    assert "resourcePath" in widget, "resourcePath must be overridden (source and installed layouts)"
    source = MODULE_PY.read_text(encoding="utf-8")
    assert 'loadUI(self.resourcePath("UI/NoduleMTL.ui"))' in source
    assert "installTorch(" in source and "PyTorchUtils" in source
    assert not re.search(r"pip_(install|ensure)\([^)]*(SimpleITK|numpy)", source), "never (re)install SimpleITK/numpy"


def _discovery_namespace(module_file: Path) -> dict:
    """Execute only the library/resource discovery functions of NoduleMTL.py, as if the
    file were at ``module_file``."""
    import os

    tree = _tree(MODULE_PY)
    wanted = {"_candidateRoots", "libraryRoot", "resourcesDir", "resourcePath"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted
    namespace = {"os": os, "_MODULE_DIR": str(module_file.parent), "_MODULE_NAME": "NoduleMTL"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    return namespace


def test_library_and_resources_found_in_source_layout():
    ns = _discovery_namespace(MODULE_PY)
    assert Path(ns["libraryRoot"]()) == REPO
    assert Path(ns["resourcePath"]("UI/NoduleMTL.ui")) == UI_FILE


def test_library_and_resources_found_in_installed_layout(tmp_path):
    installed = tmp_path / "lib" / "Slicer-5.9" / "qt-scripted-modules"
    (installed / "NoduleMTLLib").mkdir(parents=True)
    (installed / "NoduleMTLLib" / "__init__.py").write_text("")
    (installed / "Resources" / "UI").mkdir(parents=True)
    (installed / "Resources" / "UI" / "NoduleMTL.ui").write_text("<ui/>")
    ns = _discovery_namespace(installed / "NoduleMTL.py")
    assert Path(ns["libraryRoot"]()) == installed
    assert Path(ns["resourcePath"]("Icons/NoduleMTL.png")) == installed / "Resources" / "Icons" / "NoduleMTL.png"


# ---------------------------------------------------------------------------
# CMake
# ---------------------------------------------------------------------------

def _cmake_text(path: Path) -> str:
    """The file without comments (a ``#`` outside a quoted argument starts a comment)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        out, quoted = [], False
        for ch in line:
            if ch == '"':
                quoted = not quoted
            elif ch == "#" and not quoted:
                break
            out.append(ch)
        lines.append("".join(out))
    return "\n".join(lines)


def _cmake_commands(text: str, name: str) -> list[list[str]]:
    """Arguments of every ``name(...)`` call; quoted arguments keep their quotes and may
    contain parentheses."""
    calls = []
    for m in re.finditer(rf"(?<![\w$]){name}\s*\(", text, flags=re.IGNORECASE):
        i, depth, quoted = m.end(), 1, False
        while depth:
            ch = text[i]
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch == "(":
                depth += 1
            elif not quoted and ch == ")":
                depth -= 1
            i += 1
        calls.append(re.findall(r'"[^"]*"|[^\s"]+', text[m.end():i - 1]))
    return calls


def _evaluate_cmake_lists(path: Path) -> dict[str, list[str]]:
    """set(...) lists and file(GLOB_RECURSE ...) globs of NoduleMTL/CMakeLists.txt, evaluated
    against the source tree (with list(FILTER ... EXCLUDE REGEX ...) applied)."""
    text = _cmake_text(path)
    variables = {"CMAKE_CURRENT_SOURCE_DIR": str(MODULE_DIR), "MODULE_NAME": None}
    for args in _cmake_commands(text, "set"):
        if args[0] == "MODULE_NAME":
            variables["MODULE_NAME"] = args[1]

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: str(variables[m.group(1)]), s.strip('"'))

    for args in _cmake_commands(text, "get_filename_component"):
        variables[args[0]] = str(Path(expand(args[1])).resolve())
    lists: dict[str, list[str]] = {}
    for args in _cmake_commands(text, "set"):
        if args[0] != "MODULE_NAME":
            lists[args[0]] = [expand(a) for a in args[1:]]
    for args in _cmake_commands(text, "file"):
        assert args[0] == "GLOB_RECURSE", args
        var, rest = args[1], args[2:]
        assert rest[0] == "RELATIVE"
        relative_to = Path(expand(rest[1]))
        files = set()
        for pattern in (expand(a) for a in rest[2:] if a != "CONFIGURE_DEPENDS"):
            folder, file_pattern = Path(pattern).parent, Path(pattern).name
            files |= {p.relative_to(relative_to).as_posix() for p in folder.rglob("*")
                      if p.is_file() and fnmatch.fnmatch(p.name, file_pattern)}
        lists[var] = sorted(files)
    for args in _cmake_commands(text, "list"):
        if args[0] == "FILTER":
            var, mode, _regex_kw, regex = args[1], args[2], args[3], expand(args[4]).replace("\\\\", "\\")
            assert mode == "EXCLUDE"
            lists[var] = [f for f in lists[var] if not re.search(regex, f)]
    return lists


def test_module_cmake_covers_every_script_and_resource():
    lists = _evaluate_cmake_lists(MODULE_CMAKE)
    module_scripts = set(lists["MODULE_PYTHON_SCRIPTS"])
    lib_scripts = set(lists["MODULE_LIB_PYTHON_SCRIPTS"])
    resources = set(lists["MODULE_PYTHON_RESOURCES"])

    assert module_scripts == {p.name for p in MODULE_DIR.glob("*.py")}, "every .py of NoduleMTL/ is listed"
    assert lib_scripts == _files_under(LIB_DIR, "*.py"), "every .py of NoduleMTLLib/ is globbed"
    assert resources == _files_under(RESOURCES_DIR), "every file of Resources/ is globbed"
    assert {"Resources/UI/NoduleMTL.ui", "Resources/Icons/NoduleMTL.png"} <= resources
    assert all(not f.endswith(".pyc") and "__pycache__" not in f for f in lib_scripts | resources)


def test_module_cmake_installs_lib_and_resources_beside_the_module():
    text = _cmake_text(MODULE_CMAKE)
    [module_call] = _cmake_commands(text, "slicerMacroBuildScriptedModule")
    assert "WITH_GENERIC_TESTS" in module_call
    assert "${MODULE_PYTHON_SCRIPTS}" in module_call
    [lib_call] = _cmake_commands(text, "ctkMacroCompilePythonScript")

    def value(call, key):
        return call[call.index(key) + 1]

    assert value(lib_call, "SCRIPTS") == '"${MODULE_LIB_PYTHON_SCRIPTS}"'
    assert value(lib_call, "RESOURCES") == '"${MODULE_PYTHON_RESOURCES}"'
    # relative paths "NoduleMTLLib/..." and "Resources/..." are resolved from the repo root
    # and copied to <DESTINATION_DIR>/<same path>, i.e. beside NoduleMTL.py
    assert value(lib_call, "SOURCE_DIR") == "${NoduleMTL_SOURCE_ROOT}"
    assert value(lib_call, "DESTINATION_DIR") == "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
    assert value(lib_call, "INSTALL_DIR") == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
    assert "NO_INSTALL_SUBDIR" in lib_call
    assert "WITH_SUBDIR" not in module_call, "the module script must stay at the top of qt-scripted-modules"
    assert re.search(r"if\s*\(\s*BUILD_TESTING\s*\)[^)]*slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py",
                     text, flags=re.S)


def test_extension_cmake_metadata():
    text = _cmake_text(TOP_CMAKE)
    sets = {args[0]: args[1:] for args in _cmake_commands(text, "set")}
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert key in sets, key
    assert "PyTorch" in " ".join(sets["EXTENSION_DEPENDS"])
    assert _cmake_commands(text, "find_package")[0][:1] == ["Slicer"]
    assert ["${Slicer_USE_FILE}"] in _cmake_commands(text, "include")
    assert ["NoduleMTL"] in _cmake_commands(text, "add_subdirectory")
    includes = [a[0] for a in _cmake_commands(text, "include")]
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in includes and "${Slicer_EXTENSION_CPACK}" in includes


def test_icon_is_a_128px_png():
    icon = RESOURCES_DIR / "Icons" / "NoduleMTL.png"
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ---------------------------------------------------------------------------
# Scripted CLI module (NoduleMTL/NoduleMTLCLI)
# ---------------------------------------------------------------------------

CLI_DIR = MODULE_DIR / "NoduleMTLCLI"
CLI_PY, CLI_XML = CLI_DIR / "NoduleMTLCLI.py", CLI_DIR / "NoduleMTLCLI.xml"

#: Slicer Execution Model parameter tag -> argparse ``type`` (None: str) and how the value is passed.
SEM_TYPES = {"image": None, "pointfile": None, "table": None, "file": None, "directory": None, "string": None,
             "string-enumeration": None, "integer": int, "float": float, "double": float, "boolean": "flag"}


@pytest.fixture(scope="module")
def cli_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("NoduleMTLCLI_layout", CLI_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; main() runs under __main__
    return module.build_parser()


def test_cli_xml_parameters_match_the_argument_parser(cli_parser):
    """Names, flags, positions, types, defaults and choices of the XML equal the parser's."""
    root = ET.parse(CLI_XML).getroot()
    params = [p for group in root.findall("parameters") for p in group if p.tag not in ("label", "description")]
    names = [p.findtext("name") for p in params]
    assert len(names) == len(set(names))
    assert {"inputVolume", "points", "detect", "threshold", "networks", "device", "outputLabel", "outputTable"} == set(names)
    actions = {a.dest: a for a in cli_parser._actions if a.dest != "help"}
    assert set(actions) == set(names), set(actions) ^ set(names)
    positional = [a.dest for a in cli_parser._actions if not a.option_strings]
    for p in params:
        name, tag, action = p.findtext("name"), p.tag, actions[p.findtext("name")]
        assert tag in SEM_TYPES, tag
        index, longflag, flag = p.findtext("index"), p.findtext("longflag"), p.findtext("flag")
        if index is not None:
            assert positional.index(name) == int(index), name
            assert longflag is None and flag is None and not action.option_strings
        else:
            assert set(action.option_strings) == {f for f in (longflag, flag and "-" + flag.lstrip("-")) if f}, name
        if SEM_TYPES[tag] == "flag":
            assert action.nargs == 0 and action.const is True, f"{name}: a boolean is a store_true flag"
            assert action.default is ((p.findtext("default") or "false").lower() == "true")
        else:
            assert action.nargs is None, f"{name}: one value"
            assert action.type is SEM_TYPES[tag], (name, action.type)
            default = p.findtext("default")
            if default is not None:
                assert action.default == (SEM_TYPES[tag] or str)(default), name
        if tag == "string-enumeration":
            assert list(action.choices) == [e.text for e in p.findall("element")], name
        if p.get("fileExtensions") and tag == "pointfile":
            assert {".mrk.json", ".fcsv"} <= set(p.get("fileExtensions").split(","))
        channel = p.findtext("channel")
        if tag in ("image", "pointfile", "table"):
            assert channel in ("input", "output"), name
    assert [p.findtext("channel") for p in params if p.tag == "image"] == ["input", "output"]
    device = next(p for p in params if p.findtext("name") == "device")
    assert [e.text for e in device.findall("element")] == ["auto", "cpu", "cuda", "mps"]


def test_cli_folder_is_built_completely():
    """Every file of NoduleMTLCLI/ is picked up by SlicerMacroBuildScriptedCLI (NAME.py + NAME.xml)."""
    files = {p.name for p in CLI_DIR.iterdir() if p.is_file() and not _ignored(p.relative_to(REPO))}
    assert files == {"CMakeLists.txt", "NoduleMTLCLI.py", "NoduleMTLCLI.xml"}, files
    text = _cmake_text(CLI_DIR / "CMakeLists.txt")
    assert ["MODULE_NAME", "NoduleMTLCLI"] in _cmake_commands(text, "set")
    assert _cmake_commands(text, "slicerMacroBuildScriptedCLI") == [["NAME", "${MODULE_NAME}"]]
    assert ["NoduleMTLCLI"] in _cmake_commands(_cmake_text(MODULE_CMAKE), "add_subdirectory")
    source = CLI_PY.read_text(encoding="utf-8")
    assert source.startswith("#!/usr/bin/env python-real\n")
    assert "<filter-progress>" in source and "flush=True" in source


def test_slicer_requirements_cover_the_runtime_dependencies():
    """Every runtime dependency in pyproject.toml that Slicer does not ship is installed by
    ``setupPythonRequirements`` (torch/torchvision through the PyTorch extension; numpy and
    SimpleITK come with Slicer)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps}
    tree = _tree(MODULE_PY)
    reqs = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "PYTHON_REQUIREMENTS" for t in n.targets))
    listed = {re.split(r"[<>=!~ \[]", elt.elts[1].value, maxsplit=1)[0].lower() for elt in reqs.elts}
    # dicomweb-client: Slicer builds it (SuperBuild/External_python-dicomweb-client.cmake; its DICOM
    # module's DICOMweb import); only ``nodulemtl pacs`` uses it, never the Slicer module
    shipped_by_slicer = {"numpy", "simpleitk", "torch", "torchvision", "pillow", "dicomweb-client"}
    assert names - shipped_by_slicer <= listed, f"not installed in Slicer: {sorted(names - shipped_by_slicer - listed)}"
    # and the module loads the "Lung nodule" terminology context when its widget is set up
    setup = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "NoduleMTLWidget"
                 for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "setup")
    assert "_registerTerminology" in ast.unparse(setup)


# ---------------------------------------------------------------------------
# one writer, one field list, one place for the file names (issue 24)
# ---------------------------------------------------------------------------

def _code_files() -> list[Path]:
    return sorted(p for p in [*LIB_DIR.rglob("*.py"), *MODULE_DIR.glob("*.py")] if not _ignored(p.relative_to(REPO)))


def _calls(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def _constants(tree: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_output_file_names_are_defined_in_one_module():
    from NoduleMTLLib.core import filenames

    names = {n for n in filenames.MANAGED_FILES if "." in n}  # "pictures" is also an option name
    offenders = {p.relative_to(REPO).as_posix(): sorted(_constants(_tree(p)) & names) for p in _code_files()
                 if p != LIB_DIR / "core" / "filenames.py"}
    assert {k: v for k, v in offenders.items() if v} == {}, "output file names outside NoduleMTLLib/core/filenames.py"


def test_the_result_set_has_one_writer():
    """Only NoduleMTLLib/outputs/writer.py calls the file writers of a result set (the CLI, reclassify,
    batch and the Slicer export go through ``writer.write_result_set``)."""
    only_writer = {"write_seg_into_output_dir", "write_sr_into_output_dir", "write_pictures", "write_report_html",
                   "write_segmentation", "write_core_files", "write_files"}
    offenders = {p.relative_to(REPO).as_posix(): sorted(_calls(_tree(p)) & only_writer) for p in _code_files()
                 if p != LIB_DIR / "outputs" / "writer.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    users = {p.name for p in _code_files() if "write_result_set" in _calls(_tree(p))}
    assert {"cli.py", "batch.py", "NoduleMTLMRMLExport.py"} <= users


def test_the_reported_fields_are_declared_once():
    """The titles of the reported fields appear only in NoduleMTLLib/outputs/fields.py: every presenter
    (CSV, seg.nrrd and Slicer tags, Slicer table, panel, report.html, pictures, CLI line) reads them."""
    from NoduleMTLLib.outputs.fields import REPORTED_FIELDS

    titles = {f.title for f in REPORTED_FIELDS} | {f.heading for f in REPORTED_FIELDS}
    offenders = {p.relative_to(REPO).as_posix(): sorted(_constants(_tree(p)) & titles) for p in _code_files()
                 if p != LIB_DIR / "outputs" / "fields.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    readers = {p.name for p in _code_files()
               if "NoduleMTLLib.outputs.fields" in p.read_text(encoding="utf-8")
               or re.search(r"from \.+(outputs\.)?fields import", p.read_text(encoding="utf-8"))}
    assert {"files.py", "report_html.py", "pictures.py", "cli.py", "NoduleMTLMRMLScene.py", "NoduleMTLText.py",
            "dicom_seg.py"} <= readers


# ---------------------------------------------------------------------------
# layout by concern (issue 24): packages depend one way, no module import cycle
# ---------------------------------------------------------------------------

#: The library's packages and the packages each may import (at any depth, lazy imports
#: included).  The order is core <- models <- clinical <- inference <- detection <- service <- apps,
#: with outputs on core only; the root package (``__version__``, ``DEFAULT_NETWORKS``) is free to all.
ALLOWED_PACKAGE_IMPORTS = {
    "core": set(),
    "models": {"core"},
    "clinical": {"core", "models"},
    "inference": {"core", "models", "clinical"},
    "detection": {"core", "models", "clinical", "inference"},
    "service": {"core", "models", "clinical", "inference", "detection"},
    "outputs": {"core"},
    "apps": {"core", "models", "clinical", "inference", "detection", "service", "outputs"},
}
#: Packages that import without torch (also run where torch is not installed: the Slicer module
#: before its PyTorch install, report tools).
TORCH_FREE_PACKAGES = ("core", "clinical", "outputs")


def _lib_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of NoduleMTLLib (packages by their ``__init__``)."""
    out = {}
    for p in LIB_DIR.rglob("*.py"):
        if _ignored(p.relative_to(REPO)):
            continue
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> NoduleMTLLib modules it imports, from the sources (``ast``): every import
    statement at any depth (function-level imports are dependencies too), relative ones resolved."""
    modules = _lib_modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(_tree(path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for t in targets:
                if t.split(".")[0] == "NoduleMTLLib" and (k := known(t)) and k != name:
                    deps.add(k)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_library_module_lives_in_a_package_by_concern():
    flat = sorted(m for m in _lib_modules() if m.count(".") == 1 and _package(m) not in ALLOWED_PACKAGE_IMPORTS)
    assert flat == [], f"modules outside the packages {sorted(ALLOWED_PACKAGE_IMPORTS)}: {flat}"


def test_the_import_graph_is_acyclic():
    graph = _import_graph()
    assert len(graph) > 50 and graph["NoduleMTLLib.service.analysis"]  # the graph is really built
    assert _cycles(graph) == []
    # the test finds a cycle when there is one
    assert _cycles({**graph, "NoduleMTLLib.core.io": graph["NoduleMTLLib.core.io"] | {"NoduleMTLLib.apps.cli"}})


def test_packages_depend_one_way():
    wrong = sorted(f"{m} -> {d}" for m, deps in _import_graph().items() for d in deps
                   if _package(m) and _package(d) and _package(d) != _package(m)
                   and _package(d) not in ALLOWED_PACKAGE_IMPORTS[_package(m)])
    assert wrong == [], "imports against the layering (ALLOWED_PACKAGE_IMPORTS):\n" + "\n".join(wrong)
    # the allowed sets are themselves one way (no two packages may import each other)
    for p, allowed in ALLOWED_PACKAGE_IMPORTS.items():
        assert all(p not in ALLOWED_PACKAGE_IMPORTS[q] for q in allowed), p


def test_torch_free_packages_import_without_torch():
    """Every module of core, clinical and outputs imports in a fresh interpreter where torch,
    torchvision and timm cannot be imported."""
    import subprocess
    import sys

    modules = sorted(m for m in _lib_modules() if _package(m) in TORCH_FREE_PACKAGES)
    assert len(modules) > 20
    # a finder that refuses them (not sys.modules[name] = None: scipy probes sys.modules["torch"]
    # for torch arrays and fails on None, which is no statement about NoduleMTLLib)
    code = ("import importlib, importlib.abc, sys\n"
            "class Blocked(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
            "            raise ImportError(f'{name} is blocked')\n"
            "sys.meta_path.insert(0, Blocked())\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "assert not any(m.split('.')[0] in ('torch', 'torchvision', 'timm') for m in sys.modules)\n"
            "print('ok', len([m for m in sys.modules if m.startswith('NoduleMTLLib')]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_detector_input_channels_match_its_stacks():
    """The models layer does not import detection: the detector's input channel count and the
    stacks of ``detection.preprocess`` are two figures that must agree."""
    from NoduleMTLLib.detection import preprocess
    from NoduleMTLLib.models.networks import maskrcnn25d

    assert maskrcnn25d.STACK_SIZE == preprocess.STACK_SIZE == maskrcnn25d.INPUT_SPEC["channels"]
