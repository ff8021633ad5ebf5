-- Scenario 5: POST /api/feedback with a random (user, message) of the seeded ones and a random
-- vote. Arguments: TAG USERS MESSAGES (ids as in bench/src/feedback.rs; pgbench's script draws
-- the same distribution).
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local report = require("report")

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

local tag, users, messages
function init(args)
  tag, users, messages = args[1], tonumber(args[2]), tonumber(args[3])
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function request()
  local u = math.random(0, users - 1)
  local m = math.random(0, messages - 1)
  local up = math.random(0, 1) == 1 and "true" or "false"
  local body = string.format('{"chatId":"%s-c%d","messageId":"%s-m%d-%d","isUpvoted":%s}',
    tag, u, tag, u, m, up)
  return wrk.format("POST", "/api/feedback", {
    ["Content-Type"] = "application/json",
    ["x-forwarded-email"] = string.format("%s-u%d@bench.example", tag, u),
  }, body)
end

done = report.done
