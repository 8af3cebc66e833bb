<#
.SYNOPSIS
  Installs the CodeTogether agent inside WSL and sets it up to start at every Windows logon.

.DESCRIPTION
  The agent is a Linux program: on Windows it runs inside a WSL distribution. This script
    1. checks that WSL and the distribution exist (and offers the command to install them),
    2. runs installers/install.sh inside the distribution (release archive, or cargo install --locked),
    3. runs `ct-agent service install` inside the distribution, which picks:
         - a systemd user unit when systemd is enabled in the distribution (/etc/wsl.conf [boot] systemd=true);
           lingering is turned on so it runs without an open WSL shell, and WSL is kept running by a logon task;
         - otherwise a Windows logon task (Task Scheduler, folder "CodeTogether") that starts the agent in WSL.
  Pair first (`ct-agent pair <token>` inside WSL), or pass -Token.

.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-wsl.ps1 -Distro Ubuntu -AllowDir /home/me/src/app
#>
[CmdletBinding()]
param(
  # The WSL distribution (default: the default distribution).
  [string]$Distro = "",
  # A pairing token from /register in Discord.
  [string]$Token = "",
  # Folders (Linux paths inside the distribution) Claude Code may work in.
  [string[]]$AllowDir = @(),
  # Where install.sh comes from.
  [string]$InstallScriptUrl = "https://github.com/codetogether/codetogether/raw/main/installers/install.sh",
  # Build with cargo inside WSL instead of downloading a release.
  [switch]$FromSource
)
$ErrorActionPreference = "Stop"

function Invoke-Wsl([string[]]$WslArgs) {
  $all = @()
  if ($Distro) { $all += @("-d", $Distro) }
  $all += $WslArgs
  & wsl.exe @all
  if ($LASTEXITCODE -ne 0) { throw "wsl.exe $($all -join ' ') failed with exit code $LASTEXITCODE" }
}

if (-not (Get-Command wsl.exe -ErrorAction SilentlyContinue)) {
  throw "WSL is not installed. Install it from an elevated PowerShell with: wsl --install  (then reboot and run this again)"
}
$distros = (& wsl.exe --list --quiet) -replace "`0", "" | Where-Object { $_.Trim() -ne "" } | ForEach-Object { $_.Trim() }
if (-not $distros) {
  throw "WSL has no Linux distribution yet. Install one with: wsl --install -d Ubuntu"
}
if ($Distro -and ($distros -notcontains $Distro)) {
  throw "There is no WSL distribution named '$Distro'. Installed: $($distros -join ', ')"
}

# WSL 1 has no real Linux kernel: QUIC and Claude Code's tools work poorly there.
$kernel = (Invoke-Wsl @("--exec", "uname", "-r")) | Out-String
if ($kernel -notmatch "WSL2|microsoft-standard") {
  Write-Warning "This distribution runs under WSL 1. Convert it with: wsl --set-version <distro> 2"
}

Write-Host "Installing ct-agent inside WSL..."
$flags = "--no-service"
if ($FromSource) { $flags += " --from-source" }
Invoke-Wsl @("--exec", "sh", "-c", "curl -fsSL '$InstallScriptUrl' | sh -s -- $flags")

$agent = '$HOME/.local/bin/ct-agent'
if ($Token) {
  # The token goes through stdin, not the command line.
  $Token | & wsl.exe @($(if ($Distro) { @("-d", $Distro) } else { @() })) --exec sh -c "$agent pair -"
  if ($LASTEXITCODE -ne 0) { throw "pairing failed (see above); get a fresh token with /register in Discord" }
}

$allow = ($AllowDir | ForEach-Object { "--allow-dir '" + ($_ -replace "'", "'\''") + "'" }) -join " "
Invoke-Wsl @("--exec", "sh", "-c", "$agent service install $allow")

# With systemd in WSL the unit runs as long as the distribution runs; WSL starts on demand, so start it at
# logon and keep it running. (Without systemd, `service install` already registered a logon task that starts the agent.)
$systemd = (Invoke-Wsl @("--exec", "sh", "-c", "test -d /run/systemd/system && echo yes || echo no")) | Out-String
if ($systemd.Trim() -eq "yes") {
  Invoke-Wsl @("--exec", "sh", "-c", 'loginctl enable-linger "$(id -un)" 2>/dev/null || sudo loginctl enable-linger "$(id -un)"')
  $name = if ($Distro) { $Distro } else { "default" }
  # WSL may shut a distribution down once no Windows-side wsl.exe is attached, services or not: the task
  # keeps one attached (a sleeping process), in a hidden window.
  $wslArgs = if ($Distro) { "-d $Distro --exec sleep infinity" } else { "--exec sleep infinity" }
  $action = New-ScheduledTaskAction -Execute "powershell.exe" -Argument "-NoProfile -NonInteractive -WindowStyle Hidden -Command `"wsl.exe $wslArgs`""
  $trigger = New-ScheduledTaskTrigger -AtLogOn -User "$env:USERDOMAIN\$env:USERNAME"
  $settings = New-ScheduledTaskSettingsSet -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries -ExecutionTimeLimit ([TimeSpan]::Zero) -Hidden
  Register-ScheduledTask -TaskPath "\CodeTogether\" -TaskName "wsl-start-$name" -Action $action -Trigger $trigger -Settings $settings -Force | Out-Null
  Write-Host "WSL starts at logon (task \CodeTogether\wsl-start-$name); systemd then starts the agent."
}

Write-Host ""
Write-Host "Done. Check it from WSL with: ct-agent doctor   and   ct-agent service status"
