import { Command } from 'commander'
import { describe, expect, it } from 'vitest'
import { addRegistryFlags, registryOptions } from './registry-flags.js'

function parse(prefix: '' | 'src-', argv: string[]): Record<string, unknown> {
  const cmd = addRegistryFlags(new Command('t').exitOverride(), prefix, 'test')
  cmd.parse(argv, { from: 'user' })
  return cmd.opts()
}

describe('registry flags', () => {
  it('map to RegistryOptions, prefixed or not', () => {
    const flags = parse('src-', ['--src-tls-verify=false', '--src-cert-dir', '/c', '--src-registry-token', 'tok', '--src-authfile', '/a.json'])
    expect(registryOptions(flags, 'src')).toEqual({ tlsVerify: false, certDir: '/c', registryToken: 'tok', authFile: '/a.json' })
    expect(registryOptions(parse('', ['--no-creds']), '')).toEqual({ anonymous: true })
    expect(registryOptions(parse('', ['--creds', 'u:p:w']), '')).toEqual({ credentials: { username: 'u', password: 'p:w' } })
    expect(registryOptions(parse('', []), '')).toBeUndefined()
  })

  it('refuse --no-creds with --creds or --registry-token, and --registry-token with --creds', () => {
    const prefixed = [['--src-no-creds', '--src-creds', 'u:p'], ['--src-no-creds', '--src-registry-token', 't'], ['--src-registry-token', 't', '--src-creds', 'u:p']]
    for (const argv of prefixed) expect(() => parse('src-', argv), argv.join(' ')).toThrow(/cannot be used with/)
    // unprefixed, commander takes --no-creds as the negation of --creds: the last one given wins
    for (const argv of [['--no-creds', '--registry-token', 't'], ['--registry-token', 't', '--creds', 'u:p']]) {
      expect(() => parse('', argv), argv.join(' ')).toThrow(/cannot be used with/)
    }
    expect(registryOptions(parse('', ['--creds', 'u:p', '--no-creds']), '')).toEqual({ anonymous: true })
  })
})
