import { test } from 'node:test'
import assert from 'node:assert/strict'
import { allowedAddresses, compileAllowList, parseTargetAddress, type AllowList } from '../lib/allow-list'

type Resolved = Array<{ address: string, family: number }>

/** Compiles entries that must all be valid. */
function compile (entries: string[]): AllowList {
  const problems: string[] = []
  const list = compileAllowList(entries, 'allow', problems)
  assert.deepEqual(problems, [])
  return list
}

/** A lookup that always fails: whatever is allowed through it was allowed without DNS. */
async function noLookup (host: string): Promise<Resolved> {
  throw new Error(`no lookup in this test (${host})`)
}

/** True if `target` ('host:port', as a client sends it) is allowed as itself. */
async function allows (list: AllowList, target: string): Promise<boolean> {
  const parsed = parseTargetAddress(target)
  assert.ok(parsed, `${target} parses`)
  const addresses = await allowedAddresses(list, parsed, noLookup)
  if (addresses.length > 0) assert.deepEqual(addresses, [parsed])
  return addresses.length > 0
}

async function assertAllowed (list: AllowList, allowed: string[], refused: string[]): Promise<void> {
  for (const target of allowed) assert.equal(await allows(list, target), true, `${target} is allowed`)
  for (const target of refused) assert.equal(await allows(list, target), false, `${target} is refused`)
}

test('every entry form is accepted and matched', async () => {
  const list = compile(['127.0.0.1:5432', '10.0.0.0/8:5432', '[::1]:5000-5010', '[fd00::/8]:22', 'db-*.internal:5432', 'gw.example:443'])
  await assertAllowed(list,
    ['127.0.0.1:5432', '10.1.2.3:5432', '[::1]:5005', '[fd12::1]:22', 'db-1.internal:5432', 'gw.example:443'],
    ['127.0.0.2:5432', '127.0.0.1:5433', '11.0.0.1:5432', '[::2]:5005', '[fd12::1]:23', 'db-1.internal:5433', 'gw.example:80', 'other.example:443'])
})

test('port ranges include both ends; * is any port', async () => {
  await assertAllowed(compile(['[::1]:5000-5010']), ['[::1]:5000', '[::1]:5010'], ['[::1]:4999', '[::1]:5011'])
  await assertAllowed(compile(['127.0.0.1:*']), ['127.0.0.1:1', '127.0.0.1:65535'], ['127.0.0.2:1'])
  await assertAllowed(compile(['gw.example:*']), ['gw.example:1', 'gw.example:65535'], ['gw.example.net:80'])
  const any = compile(['127.0.0.1:*', '[fe80::/10]:*'])
  const loopback = async (): Promise<Resolved> => [{ address: '127.0.0.1', family: 4 }]
  for (const target of [{ host: '127.0.0.1', port: 65536 }, { host: '127.0.0.1', port: 80.5 }, { host: '', port: 80 }, { host: 'fe80::1%eth0', port: 80 }]) {
    assert.deepEqual(await allowedAddresses(any, target, loopback), [], JSON.stringify(target))
  }
})

test('CIDR boundaries, IPv4 and IPv6', async () => {
  await assertAllowed(compile(['192.168.4.0/22:80']),
    ['192.168.4.0:80', '192.168.7.255:80'], ['192.168.3.255:80', '192.168.8.0:80'])
  await assertAllowed(compile(['[fd00::/8]:22']),
    ['[fd00::]:22', '[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:22'], ['[fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:22', '[fe00::]:22'])
  await assertAllowed(compile(['[2001:db8::/126]:80']), ['[2001:db8::3]:80', '[2001:DB8::]:80'], ['[2001:db8::4]:80'])
  // An IPv6 literal comes back in its compressed form: the form that was checked.
  assert.deepEqual(await allowedAddresses(compile(['[2001:db8::/126]:80']), { host: '2001:DB8:0:0:0:0:0:0', port: 80 }, noLookup),
    [{ host: '2001:db8::', port: 80 }])
  await assertAllowed(compile(['0.0.0.0/0:80']), ['1.2.3.4:80', '255.255.255.255:80'], ['[::1]:80'])
})

test('a glob covers one label, never a dot, and no empty text', async () => {
  const list = compile(['db-*.internal:5432'])
  await assertAllowed(list, ['db-a.internal:5432', 'db-a_b-c.internal:5432', 'db-1.internal.:5432'],
    ['db-a.b.internal:5432', 'db-.internal:5432', 'db-a.internal.evil:5432', 'xdb-a.internal:5432', 'db-a:5432'])
  await assertAllowed(compile(['*.*.example:443']), ['a.b.example:443'], ['a.example:443', 'a.b.c.example:443'])
})

test('names and patterns match case-insensitively; a trailing dot is ignored', async () => {
  await assertAllowed(compile(['DB-*.Internal.:5432', 'GW.example:443']),
    ['db-A.INTERNAL:5432', 'Db-1.internal.:5432', 'gw.EXAMPLE.:443'], ['gw.example.x:443'])
  assert.deepEqual(await allowedAddresses(compile(['gw.example:443']), { host: 'GW.Example.', port: 443 }, noLookup),
    [{ host: 'gw.example', port: 443 }])
})

test('an IPv4-mapped IPv6 address is judged, and returned, as the IPv4 address it maps to', async () => {
  const v4 = compile(['127.0.0.1:5432'])
  for (const host of ['::ffff:127.0.0.1', '::FFFF:7f00:1', '0:0:0:0:0:ffff:127.0.0.1']) {
    assert.deepEqual(await allowedAddresses(v4, { host, port: 5432 }, noLookup), [{ host: '127.0.0.1', port: 5432 }], host)
  }
  assert.deepEqual(await allowedAddresses(v4, { host: '::ffff:127.0.0.2', port: 5432 }, noLookup), [])
  // An IPv6 entry allows IPv6 only, even one that BlockList would let match IPv4 or mapped addresses.
  const v6 = compile(['[::/0]:80', '[::ffff:0:0/80]:80'])
  for (const host of ['127.0.0.1', '::ffff:127.0.0.1', '::ffff:10.0.0.1']) {
    assert.deepEqual(await allowedAddresses(v6, { host, port: 80 }, noLookup), [], host)
  }
  assert.deepEqual(await allowedAddresses(v6, { host: '::1', port: 80 }, noLookup), [{ host: '::1', port: 80 }])
  // A mapped entry is the IPv4 address or subnet it maps to.
  const mapped = compile(['[::ffff:127.0.0.1]:80', '[::ffff:10.0.0.0/104]:80'])
  await assertAllowed(mapped, ['127.0.0.1:80', '10.255.0.1:80'], ['127.0.0.2:80', '11.0.0.1:80', '[::1]:80'])
  assert.deepEqual(await allowedAddresses(mapped, { host: '::ffff:10.1.1.1', port: 80 }, noLookup), [{ host: '10.1.1.1', port: 80 }])
})

test('a name no entry names is judged by the addresses it resolves to', async () => {
  const list = compile(['10.0.0.0/8:5432', '[fd00::/8]:5432', 'db-*.internal:5432'])
  const seen: string[] = []
  const lookup = async (host: string): Promise<Resolved> => {
    seen.push(host)
    if (host !== 'db.example') throw Object.assign(new Error('not found'), { code: 'ENOTFOUND' })
    return [
      { address: '192.168.1.1', family: 4 },
      { address: 'fd00::2', family: 6 },
      { address: '127.0.0.1', family: 4 },
      { address: '10.0.0.7', family: 4 },
      { address: '::ffff:10.0.0.8', family: 6 },
      { address: '::1', family: 6 },
      { address: '::ffff:10.0.0.7', family: 6 }
    ]
  }
  assert.deepEqual(await allowedAddresses(list, { host: 'db.example', port: 5432 }, lookup), [
    { host: 'fd00::2', port: 5432 }, { host: '10.0.0.7', port: 5432 }, { host: '10.0.0.8', port: 5432 }
  ])
  assert.deepEqual(await allowedAddresses(list, { host: 'db.example', port: 5433 }, lookup), [])
  assert.deepEqual(await allowedAddresses(list, { host: 'missing.example', port: 5432 }, lookup), [])
  // A name entry allows the name as itself, unresolved.
  assert.deepEqual(await allowedAddresses(list, { host: 'db-1.internal', port: 5432 }, lookup), [{ host: 'db-1.internal', port: 5432 }])
  assert.deepEqual(seen, ['db.example', 'db.example', 'missing.example'])
})

test('a name the resolver reads as an IPv4 address is never allowed by a name entry', async () => {
  const list = compile(['*:5432', '*.*:5432'])
  const lookup = async (): Promise<Resolved> => [{ address: '127.0.0.1', family: 4 }]
  for (const host of ['2130706433', '127.1', '0x7f.1', '0x7f000001']) {
    assert.deepEqual(await allowedAddresses(list, { host, port: 5432 }, lookup), [], host)
  }
  assert.deepEqual(await allowedAddresses(list, { host: 'db', port: 5432 }, noLookup), [{ host: 'db', port: 5432 }])
})

test('the default lookup: localhost and 127.1 resolve to loopback only', async () => {
  const list = compile(['127.0.0.0/8:*'])
  const localhost = await allowedAddresses(list, { host: 'localhost', port: 80 })
  assert.ok(localhost.length > 0, 'localhost resolves to some 127/8 address')
  for (const { host, port } of localhost) {
    assert.match(host, /^127\./)
    assert.equal(port, 80)
  }
  assert.deepEqual(await allowedAddresses(list, { host: '127.1', port: 80 }), [{ host: '127.0.0.1', port: 80 }])
  assert.deepEqual(await allowedAddresses(list, { host: '2130706433', port: 80 }), [{ host: '127.0.0.1', port: 80 }])
  assert.deepEqual(await allowedAddresses(compile(['10.0.0.0/8:*']), { host: '127.1', port: 80 }), [])
  assert.deepEqual(await allowedAddresses(list, { host: 'no-such-host.invalid', port: 80 }), [])
})

test('every malformed entry adds one problem line naming its index; none throws', () => {
  const bad = [
    '10.0.0.0/33:5432', // prefix too long
    '[fd00::/129]:22',
    '10.0.0.0/-1:80',
    '10.0.0.0/8/8:80',
    '127.0.0.1:0', // port 0
    '127.0.0.1:65536',
    '[::1]:5010-5000', // reversed
    '[::1]:0-10',
    ':5432', // empty host
    '[]:80',
    'gw.example', // no port
    'gw.example:',
    '!!garbage!!',
    '::1:80', // IPv6 without brackets
    '[10.0.0.1]:80',
    '[gw.example]:80',
    'gw.example/24:80',
    '10.0.0.256:80',
    '10.0.0:80',
    'db-*.1:80',
    'a..b:80',
    'gw example:80',
    'http://gw.example:80',
    '[fe80::1%eth0]:80',
    'db-?.internal:80'
  ]
  const good = ['127.0.0.1:5432', 'gw.example:443']
  const problems: string[] = []
  const list = compileAllowList([good[0], ...bad, good[1]], "routes['/db'].target.allow", problems)
  assert.equal(problems.length, bad.length)
  bad.forEach((entry, i) => {
    assert.equal(problems[i], `routes['/db'].target.allow[${i + 1}]: ${JSON.stringify(entry)} is not an allow-list entry ` +
      "(use 'host:port', 'ip/prefix:port', '[ipv6]:port', 'name-*.domain:port'; port 'N', 'N-M' or '*')")
  })
  assert.ok(list)
})

test('a list with problems still allows its good entries, and nothing else', async () => {
  const problems: string[] = []
  const list = compileAllowList(['10.0.0.0/33:5432', '127.0.0.1:5432'], 'allow', problems)
  assert.equal(problems.length, 1)
  await assertAllowed(list, ['127.0.0.1:5432'], ['10.0.0.1:5432'])
})

test('parseTargetAddress', () => {
  const good: Array<[string, { host: string, port: number }]> = [
    ['[::1]:80', { host: '::1', port: 80 }],
    ['[FD00::1]:5432', { host: 'fd00::1', port: 5432 }],
    ['db-1.internal:5432', { host: 'db-1.internal', port: 5432 }],
    ['DB-1.Internal.:5432', { host: 'db-1.internal', port: 5432 }],
    ['127.0.0.1:65535', { host: '127.0.0.1', port: 65535 }],
    ['localhost:1', { host: 'localhost', port: 1 }]
  ]
  for (const [value, expected] of good) assert.deepEqual(parseTargetAddress(value), expected, value)
  const bad = ['::1:80', 'a@b:80', 'host:', 'host:0', 'host:65536', 'host:123456', '[fe80::1%eth0]:80', 'fe80::1%eth0:80',
    ':80', '.:80', '[]:80', '[::1]', 'host', 'a b:80', 'a/b:80', 'a#b:80', 'a?b:80', 'a%2e:80', 'a\\b:80',
    'a\tb:80', 'a\nb:80', 'a\u0000b:80', 'a\u007fb:80', 'a\u0085b:80', 'host:80 ', 'host:+80', 'host:8_0',
    '[1.2.3.4]:80', '[gw.example]:80', '[::1]]:80', 'a:b:80']
  for (const value of bad) assert.equal(parseTargetAddress(value), null, JSON.stringify(value))
})

test('globs match without backtracking, and names longer than DNS allows are refused as malformed', { timeout: 10000 }, async () => {
  const problems: string[] = []
  const list = compileAllowList(['*-*-*-*-*-*-*-*.lab.example:22', 'a*b*c.example:22'], 'allow', problems)
  assert.deepEqual(problems, [])
  // The old RegExp form of this pattern ran for seconds on a crafted label (polynomial backtracking); the test's
  // own timeout is the guard.
  const crafted = '-'.repeat(62) + '!'
  assert.deepEqual(await allowedAddresses(list, { host: `${crafted}.lab.example`, port: 22 }, async () => []), [])
  const dashes = '-'.repeat(63)
  assert.deepEqual(await allowedAddresses(list, { host: `${dashes}.lab.example`, port: 22 }), [{ host: `${dashes}.lab.example`, port: 22 }], "a '*' takes dashes too")
  assert.deepEqual(await allowedAddresses(list, { host: 'a-b-c-d-e-f-g-h.lab.example', port: 22 }), [{ host: 'a-b-c-d-e-f-g-h.lab.example', port: 22 }])
  assert.deepEqual(await allowedAddresses(list, { host: 'a-b-c-d-e-f-g.lab.example', port: 22 }, async () => []), [], 'each * takes one or more')
  assert.deepEqual(await allowedAddresses(list, { host: 'axxbyyc.example', port: 22 }), [{ host: 'axxbyyc.example', port: 22 }])
  assert.deepEqual(await allowedAddresses(list, { host: 'abc.example', port: 22 }, async () => []), [])
  assert.deepEqual(await allowedAddresses(list, { host: 'abbc.example', port: 22 }, async () => []), [], "'b' cannot be both a star's and the literal")
  assert.deepEqual(await allowedAddresses(list, { host: 'axbxc.example', port: 22 }), [{ host: 'axbxc.example', port: 22 }])
  assert.equal(parseTargetAddress(`${'a'.repeat(64)}.example:22`), null, 'a label over 63 characters')
  assert.equal(parseTargetAddress(`${'a.'.repeat(127)}ab:22`), null, 'a name over 253 characters')
  assert.deepEqual(parseTargetAddress(`${'a'.repeat(63)}.example:22`), { host: `${'a'.repeat(63)}.example`, port: 22 })
})
