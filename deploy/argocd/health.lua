-- Argo CD health check for dbshift.io/DatabaseMigration.
--   Healthy      Ready=True and status.observedGeneration == metadata.generation
--   Progressing  no status yet, observedGeneration behind, or phase Pending, Migrating,
--                RollingBack (or Succeeded before Ready turns True)
--   Degraded     Stalled=True (cannot go on without a spec change), or phase Failed/RolledBack
--   Suspended    phase AwaitingApproval (dbshift approve), Suspended (spec.suspend) or Waiting
--                (outside its maintenance windows): the run waits
-- The message is the phase, the tenant progress ("7/10") and status.message.
-- Only Lua's base library is used: Argo CD runs custom checks without string and math.
local hs = { status = "Progressing", message = "Waiting for the dbshift controller" }

local function condition(st, kind)
  if st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function nonempty(s)
  return s ~= nil and s ~= ""
end

-- "Migrating 7/10: tenant_acme done" from the phase, progress summary and a message.
local function describe(st, msg)
  local text = ""
  if nonempty(st.phase) then
    text = st.phase
  end
  if st.progress ~= nil and nonempty(st.progress.summary) then
    if text ~= "" then
      text = text .. " "
    end
    text = text .. st.progress.summary
  end
  if nonempty(msg) then
    if text ~= "" then
      text = text .. ": "
    end
    text = text .. msg
  end
  return text
end

if obj.status == nil then
  return hs
end
local st = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = tonumber(obj.metadata.generation)
end
local observed = tonumber(st.observedGeneration)

if observed == nil or (generation ~= nil and observed < generation) then
  if generation ~= nil then
    hs.message = "Waiting for the dbshift controller to observe generation " .. tostring(generation)
  end
  return hs
end

local stalled = condition(st, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  if nonempty(stalled.message) then
    hs.message = describe(st, stalled.message)
  else
    hs.message = describe(st, st.message)
  end
  return hs
end

if st.phase == "Failed" or st.phase == "RolledBack" then
  hs.status = "Degraded"
  hs.message = describe(st, st.message)
  return hs
end

if st.phase == "AwaitingApproval" or st.phase == "Suspended" or st.phase == "Waiting" then
  hs.status = "Suspended"
  hs.message = describe(st, st.message)
  return hs
end

local ready = condition(st, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(st, st.message)
  return hs
end

-- Pending, Migrating, RollingBack, or Succeeded before Ready is True.
local msg = st.message
if not nonempty(msg) and ready ~= nil then
  msg = ready.message
end
local text = describe(st, msg)
if text ~= "" then
  hs.message = text
end
return hs
