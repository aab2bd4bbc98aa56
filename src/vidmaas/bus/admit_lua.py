"""The one script that admits a new task on a single Redis (``TaskQueue.enqueue_announced``).

Guarantees: it is composed of the very bodies the step-by-step path runs (the queue's
enqueue and positions scripts, ``bus.events``' publish script), each wrapped as a local
function of its own ``KEYS`` and ``ARGV`` (``lua_function``), so the two paths cannot
drift apart; it runs them in order in one atomic script, then announces the move.
"""

from __future__ import annotations

from vidmaas.bus.events import PUBLISH_BODY
from vidmaas.bus.queue_lua import ENQUEUE_BODY, LIB, POSITIONS_BODY


def lua_function(name: str, body: str) -> str:
    """A script body as a local Lua function of (KEYS, ARGV): the parameters shadow the
    script's own tables, so one script can run several bodies on arguments it builds."""
    return f"local function {name}(KEYS, ARGV)\n{body}\nend\n"


ADMIT_DRIVER = """
-- After LIB and the local functions enqueue, positions and publish (``lua_function``).
-- KEYS: 1-12 as ENQUEUE_LUA, 13 task stream, 14 global stream
-- ARGV: 1-10 as ENQUEUE_LUA, 11 moved channel, 12 position mark, 13 index (in the
--       publish arguments) of the field value holding the mark, 14... PUBLISH_BODY's
--       arguments for the queued event, its position written as the mark
local ek, ea, pa = {}, {}, {}
for i = 1, 12 do ek[i] = KEYS[i] end
for i = 1, 10 do ea[i] = ARGV[i] end
for i = 14, #ARGV do pa[#pa + 1] = ARGV[i] end
enqueue(ek, ea)
local pos = positions({KEYS[1], KEYS[8]}, {ARGV[10], ARGV[1], ARGV[2]})[1]
local shown = pos
if shown < 0 then shown = 0 end
local at = tonumber(ARGV[13])
pa[at] = (string.gsub(pa[at], ARGV[12], tostring(shown)))
publish({KEYS[13], KEYS[14]}, pa)
redis.call('PUBLISH', ARGV[11], '1')
return pos
"""

ADMIT_LUA = (LIB + lua_function("enqueue", ENQUEUE_BODY)
             + lua_function("positions", POSITIONS_BODY)
             + lua_function("publish", PUBLISH_BODY) + ADMIT_DRIVER)
