-- One fixed request, sent again and again (wrk's fast static path: no
-- request() function).  Arguments after "--": METHOD [BODY]; the path
-- comes from the URL.  A body is sent as application/json.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

function init(args)
   wrk.method = args[1] or "GET"
   if args[2] ~= nil then
      wrk.body = args[2]
      wrk.headers["Content-Type"] = "application/json"
   end
end
