-- Scenarios 1 and 2: a 1 KiB JSON POST to the agent path (the upstream answers 1 KiB of JSON).
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local report = require("report")

local head = '{"input":[{"role":"user","content":"'
local tail = '"}],"custom_inputs":{"source":"bench"}}'
wrk.method = "POST"
wrk.path = "/invocations"
wrk.headers["Content-Type"] = "application/json"
wrk.body = head .. string.rep("x", 1024 - #head - #tail) .. tail

done = report.done
