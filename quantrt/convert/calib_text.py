"""The built-in calibration text: varied English prose (narrative, science, instructions,
dialogue, code-like lines, numbers) written for quantrt, so that GPTQ and AWQ run
offline.  It is short; ``--calib FILE`` with text like the model's real inputs
calibrates better.  Samples are windows of this text, overlapping when it is too short
for the requested number of samples."""

DEFAULT_TEXT = """\
The river had been rising for three days before anyone in the village took it seriously. \
On the first morning the baker noticed that the stepping stones behind her shop were gone, \
and she said so to the postman, who shrugged and said the spring was always wet. On the \
second morning the water reached the bottom of the old stone bridge, and the children \
stood on it throwing sticks, counting how quickly the current carried them out of sight. \
By the third morning the school was closed, the fields were brown lakes, and the mayor was \
standing on a chair in the town hall asking for volunteers with boats.

Water expands when it freezes, which is why pipes burst in winter and why rocks split on \
mountainsides. Most substances become denser as they cool, but liquid water is densest at \
about four degrees Celsius; below that, its molecules begin to arrange themselves into an \
open hexagonal lattice held together by hydrogen bonds. Ice therefore floats, lakes freeze \
from the top down, and the water beneath stays liquid through the winter, which is one \
reason fish survive in cold climates.

To replace a bicycle tyre, first shift the chain onto the smallest sprocket and open the \
brake so the wheel can pass between the pads. Loosen the axle nuts or the quick release, \
remove the wheel, and let out any remaining air. Use two tyre levers to lift one bead of \
the tyre over the rim, working around the wheel, then pull out the old tube. Check the \
inside of the tyre with your fingers for thorns or glass before fitting the new tube, and \
inflate it slightly so that it holds its shape while you push the bead back into place.

"Are you sure this is the right train?" she asked, looking at the board for the fourth time.
"It says platform nine, departing at 10:42, calling at every station to the coast."
"That is what worries me. Every station means we arrive after dark."
"Then we will have dinner by the harbour and find the hotel in the morning. It is not the \
end of the world." He folded the newspaper and stood up as the train pulled in.

In 1854 a physician named John Snow mapped the cases of cholera in a London neighbourhood \
and noticed that they clustered around a single public water pump on Broad Street. He \
persuaded the local council to remove the pump handle, and the outbreak, already declining, \
came to an end. His map is often described as one of the founding documents of \
epidemiology, the study of how diseases spread through populations, although the idea \
that cholera was carried by water was not widely accepted until decades later.

def mean(values):
    total = 0.0
    for v in values:
        total += v
    return total / len(values) if values else 0.0

The quarterly report showed revenue of 4.2 million, up 12 percent from the same period \
last year, while operating costs rose by only 3 percent. The board approved a dividend of \
0.35 per share and announced plans to open two new offices, one in Lisbon and one in \
Osaka, before the end of the following year. Analysts noted that the growth came mainly \
from long-term service contracts rather than one-off sales.

A good loaf of bread needs only flour, water, salt and yeast, but time is the ingredient \
most people forget. Mix the dough until it is shaggy, rest it for half an hour so the flour \
can absorb the water, and then knead or fold it until it feels smooth and springs back \
when pressed. Let it rise somewhere warm until it has doubled, shape it gently, and bake \
it in a very hot oven with a tray of water on the lowest shelf to give the crust its shine.

The committee met on Tuesday to discuss the new library. Some members wanted a larger \
reading room with tall windows; others argued that the budget should go to longer opening \
hours and more staff. After two hours they agreed on a compromise: a modest building, a \
garden for reading in summer, and evening opening three days a week. The architect \
promised revised drawings within a month.

Light from the Sun takes about eight minutes and twenty seconds to reach the Earth, but \
the energy it carries was produced in the core long before that. Photons created by \
nuclear fusion scatter through the dense interior for tens of thousands of years, losing \
and gaining energy countless times, before they reach the surface and escape into space. \
What we see as sunlight is therefore both very recent and very old.

She opened the letter slowly, recognising her grandmother's handwriting at once: the long \
loops, the careful dots over every i. Inside were three pressed flowers, a recipe for plum \
jam, and a single line at the bottom of the page that said, in capitals, DO NOT LET YOUR \
BROTHER COOK THIS. She laughed so loudly that the cat jumped off the windowsill.
"""
