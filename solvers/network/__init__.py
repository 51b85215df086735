"""The numpy network IR and the file formats around it: layers (:mod:`.layers`), the
:class:`~solvers.network.ir.Network` (:mod:`.ir`), ONNX import (:mod:`.onnx`), verification
specifications (:mod:`.spec`) and VNN-LIB 1.0 reading/writing (:mod:`.vnnlib`)."""
