"""Subject-driven generation data: shapes-world subjects and the DreamBooth folder layout.

Shapes-world subjects. The embedded tiny Stable Diffusion knows every word of the shapes
world's captions, but each shape it has seen is one flat colour. A *subject* is a shape
no caption can describe: its own class word (``square``, ``circle``, ``triangle``), two
fixed colours and an inner pattern, drawn with the shapes world's renderer (same
sub-pixel polygons, same 64-pixel reference frame, same colour-contrast rules):

    striped_square   a green square with a red stripe down its middle
    badge_circle     a red circle with a yellow cross inside it
    inlaid_triangle  a green triangle with an upside-down blue triangle inlaid in it

The colours and the pattern are the subject's identity; position, size and rotation
vary from image to image. A fine-tuning method has to bind the pattern to a new token
("a sks square") and still follow the rest of the prompt, which ``EVAL_PROMPTS`` vary
in the shapes vocabulary only (background, an extra ordinary shape, the subject's
colour, two copies); each records what it asks for, so the shapes classifier oracle
(``orthodiff.eval.oracles``) can check it. ``reference_images`` renders what an ideal
answer to such a prompt looks like.

The patterns are as coarse as the tiny model's f=4 VAE allows (a pattern band is 1-2
latent pixels wide), and even so its round trip softens them (the badge's cross comes
back as a yellow blob with stubby arms): the VAE reconstruction of the training images
is the ceiling of any method's subject fidelity, and worth reporting next to it.

Every subject is legal on every background: the colours that touch the background
contrast with all four (``MIN_CONTRAST``), and a pattern differs from the body by at
least ``MIN_DETAIL_CONTRAST`` grey levels, so Canny sees it. The extra shapes and
recolourings in ``EVAL_PROMPTS`` use only orange and purple, which no subject uses, so
the world's rule that the shapes of a scene have distinct colours holds.

The DreamBooth layout (google/dreambooth's ``dataset/``): one folder per subject,

    root/<subject>/00.jpg 01.png ...   3-6 images (*.jpg, *.jpeg, *.png, *.webp)
    root/<subject>/class.txt           the class word, e.g. "dog"            (optional)
    root/<subject>/prompt.txt          the instance prompt template          (optional)
    root/prompts_and_classes.txt       google/dreambooth's subject,class list (optional)

``SubjectDataset`` reads it; ``write_subject`` writes a shapes-world subject in it (its
prompt.txt names the training background, "a {token} {cls} on a white background", the
way every shapes caption names one), so the default data goes through the same loader
as real photographs.

The parts: ``catalogue`` (the subjects, the evaluation prompts and their labels),
``render`` (drawing subjects and reference images), ``writer`` (``write_subject``),
``dataset`` (reading the DreamBooth layout) and ``tokens`` (``check_token``). Everything
public is importable from here.
"""

from orthodiff.data.subjects.catalogue import (
                                               EVAL_PROMPTS,
                                               MIN_DETAIL_CONTRAST,
                                               SUBJECT_SIZE_RANGE,
                                               SUBJECTS,
                                               Subject,
                                               class_prompt,
                                               expected_labels,
                                               get_subject,
                                               instance_prompt,
                                               subject_colors,
)
from orthodiff.data.subjects.dataset import (
                                               DEFAULT_TEMPLATE,
                                               DREAMBOOTH_CLASSES,
                                               IMAGE_SUFFIXES,
                                               SubjectDataset,
                                               find_class_word,
                                               read_dreambooth_classes,
                                               subject_class_word,
)
from orthodiff.data.subjects.render import (
                                               check_image_count,
                                               check_image_size,
                                               reference_images,
                                               render_subject,
                                               subject_images,
                                               subject_mask,
                                               subject_placements,
)
from orthodiff.data.subjects.tokens import CANDIDATE_TOKENS, WORLD_WORDS, check_token, single_piece_tokens
from orthodiff.data.subjects.writer import GENERATOR_VERSION, MARKER, write_subject

__all__ = ["CANDIDATE_TOKENS", "DEFAULT_TEMPLATE", "DREAMBOOTH_CLASSES", "EVAL_PROMPTS", "GENERATOR_VERSION",
           "IMAGE_SUFFIXES", "MARKER", "MIN_DETAIL_CONTRAST", "SUBJECTS", "SUBJECT_SIZE_RANGE", "Subject",
           "SubjectDataset", "WORLD_WORDS", "check_image_count", "check_image_size", "check_token", "class_prompt",
           "expected_labels", "find_class_word", "get_subject", "instance_prompt", "read_dreambooth_classes",
           "reference_images", "render_subject", "single_piece_tokens", "subject_class_word", "subject_colors",
           "subject_images", "subject_mask", "subject_placements", "write_subject"]
