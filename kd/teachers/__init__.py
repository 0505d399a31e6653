"""Teachers: the frozen wrapper every teacher runs in (``frozen``), building the run's teacher (``build``),
and the teacher-output cache (``cache``) with its filling (``fill``)."""

from kd.teachers.frozen import FrozenTeacher, fingerprint

__all__ = ["FrozenTeacher", "fingerprint"]
