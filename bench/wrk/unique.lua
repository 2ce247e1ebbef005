-- POST a body in which the placeholder {ID} is replaced by a module ID new
-- for every request: PREFIX .. thread number .. "-" .. counter, so the
-- registry grows.  Arguments after "--": PREFIX BODY-TEMPLATE.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local counter = 0
local threads = 0
local head, tail, prefix

function setup(thread)
   thread:set("thread_number", threads)
   threads = threads + 1
end

function init(args)
   prefix = args[1] .. tostring(thread_number or 0) .. "-"
   local template = args[2]
   local first, last = string.find(template, "{ID}", 1, true)
   head = string.sub(template, 1, first - 1)
   tail = string.sub(template, last + 1)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   return wrk.format(nil, nil, nil, head .. prefix .. counter .. tail)
end
