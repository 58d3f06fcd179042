-- One retention step on one stream: removes the oldest entries that retention no longer
-- covers, at most a budget of them, and removes an inbox or a conversation that age emptied
-- (with its marks, so a later message starts it again with a new epoch). An inbox emptied by
-- acknowledgements, and a room, keep their offsets.
--
-- KEYS: 1 the meta hash, 2 the stream, 3.. the stream's other keys, removed with it
-- ARGV: 1 kind (room, inbox or conversation), 2 most entries kept (rooms; 0: no bound),
--       3 entries with a ts below this are old (0: no age limit), 4 the budget
-- Returns {entries removed, 1 when the stream was removed, 1 when entries remain to remove}.
local kind = ARGV[1]
local keep, old_before, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
local floor = last
local cut = 0
if kind == 'room' then
  if keep > 0 and last > keep then
    cut = last - keep
  end
elseif kind == 'inbox' then
  floor = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
  local lowest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if lowest[2] then
    floor = math.min(floor, tonumber(lowest[2]))
  end
  -- Acknowledged everywhere: delivered, and the conversation keeps the message.
  cut = floor
end
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', budget)
if not oldest[1] then
  cut = 0
else
  if old_before > 0 then
    -- Timestamps follow offsets, so the old entries are the oldest offsets.
    for _, entry in ipairs(oldest) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 't' then
          if tonumber(fields[i + 1]) < old_before then
            cut = math.max(cut, tonumber(string.match(entry[1], '^(%d+)')))
          end
          break
        end
      end
    end
  end
  local reach = tonumber(string.match(oldest[#oldest][1], '^(%d+)'))
  cut = math.min(cut, reach)
end
local removed = 0
if cut > 0 then
  removed = redis.call('XTRIM', KEYS[2], 'MINID', cut + 1)
end
local more = 0
if removed >= budget then
  more = 1
end
local gone = 0
local expirable = kind == 'conversation' or (kind == 'inbox' and floor < last)
if expirable and more == 0 and old_before > 0 and last > 0
    and redis.call('XLEN', KEYS[2]) == 0 then
  redis.call('DEL', unpack(KEYS))
  gone = 1
end
return {removed, gone, more}
