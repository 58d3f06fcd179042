-- Reads a page of a stream's newest entries below an offset, newest first, with one more than
-- asked for, which only tells whether older ones exist.
--
-- KEYS: 1 the stream's meta hash, 2 the stream
-- ARGV: 1 the offset to read below (0: from the newest), 2 the most entries
-- Returns {epoch (empty when unset), entries}.
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local newest = '+'
if ARGV[1] ~= '0' then
  -- Complete ids: an exclusive end of `N` alone would mean below N-<max>.
  newest = '(' .. ARGV[1] .. '-0'
end
return {epoch, redis.call('XREVRANGE', KEYS[2], newest, '-', 'COUNT', tonumber(ARGV[2]) + 1)}
