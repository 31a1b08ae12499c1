variable "name" {
  type        = string
  description = "Prefix of the access-log bucket; must start with karrots-."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.name))
    error_message = "name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "retention_days" {
  type        = number
  description = "Days access logs are kept."
  default     = 365
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}
