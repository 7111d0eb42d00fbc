"""Building blocks shared by the methods (section 1 of the method specification).

Each is written once here: EMA teachers, ramp-ups, losses with the ignore index, confidence masks, pseudo labels,
CutMix box masks and ClassMix masks, and the all-reduce used to keep method state consistent across workers.
"""

from raysemi.methods.components.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum, world_size
from raysemi.methods.components.frames import canonical_to_crop, crop_to_canonical
from raysemi.methods.components.hyper import (
    EMA_BUFFERS,
    BoxMaskHyper,
    ConfidenceGateHyper,
    EmaTeacherHyper,
    OhemHyper,
    RampUpHyper,
)
from raysemi.methods.components.losses import (
    confidence_mask,
    cross_entropy,
    mse_prob,
    ohem_cross_entropy,
    pseudo_label_accuracy,
    pseudo_labels,
    soft_cross_entropy,
)
from raysemi.methods.components.masks import (
    classmix_masks,
    component_box_mask,
    cutmix_box_masks,
    mix,
    mix_with_next,
    paste_by_class,
)
from raysemi.methods.components.modes import draws_dropout, dropout_off, frozen
from raysemi.methods.components.teacher import (
    RAMPUPS,
    MeanTeacherMethod,
    ema_decay_at,
    ema_update,
    make_teacher,
    rampup,
    run_scaled_decay,
)

__all__ = ['rampup', 'make_teacher', 'ema_decay_at', 'run_scaled_decay', 'ema_update', 'MeanTeacherMethod', 'RAMPUPS', 'cross_entropy', 'soft_cross_entropy', 'mse_prob', 'ohem_cross_entropy', 'confidence_mask', 'pseudo_labels', 'pseudo_label_accuracy', 'cutmix_box_masks', 'mix', 'mix_with_next', 'classmix_masks', 'paste_by_class', 'component_box_mask', 'world_size', 'all_reduce_mean', 'all_reduce_sum', 'all_gather_cat', 'canonical_to_crop', 'crop_to_canonical', 'draws_dropout', 'dropout_off', 'frozen', 'EMA_BUFFERS', 'BoxMaskHyper', 'ConfidenceGateHyper', 'EmaTeacherHyper', 'OhemHyper', 'RampUpHyper']
